"""Helpers for tests/colab_env.sh (stdlib only, any Python 3): Colab's pip freeze → constraints and pins,
environment snapshots and the diff that says which preinstalled package pip changed.

    python colab_env.py constraints FREEZE            > constraints.txt
    python colab_env.py pins FREEZE REPORT.json...    > pins.txt   (freeze ∩ the packages the reports would install)
    python colab_env.py install-args NOTEBOOK SOURCE  > args.txt   (notebook 99's `%pip install …`, PACKAGE = SOURCE)
    python colab_env.py snapshot OUT.json                          (run by the environment's python)
    python colab_env.py diff BEFORE.json AFTER.json [NAME...]      (exit 1 if a package present before changed,
                                                                    except the NAMEs, which are reported as allowed)
"""
import json, re, sys
from pathlib import Path

# Lines of the freeze that say how Colab *built* its runtime rather than what a package resolver may change:
# the CUDA libraries (Colab's torch is a +cu128 build from PyTorch's own index; PyPI's torch 2.11 wants CUDA 13
# wheels) and packages installed from local files or git.
_BUILD_SPECIFIC = re.compile(r'^(nvidia-|cuda-)', re.I)


def canon(name: str) -> str:
    "A distribution name in PEP 503 normal form (`Pillow` → `pillow`, `jupyter_core` → `jupyter-core`)."
    return re.sub(r'[-_.]+', '-', name).lower()


def parse_freeze(text: str) -> dict:
    "`{canonical name: version}` for every `name==version` line of a pip freeze (local labels like `+cu128` dropped)."
    pins = {}
    for line in text.splitlines():
        m = re.match(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;+]+)', line.strip())
        if m: pins[canon(m.group(1))] = m.group(2)
    return pins


def constraints(freeze: dict) -> list:
    "Constraint lines pinning every freeze package a resolver could pick, except the CUDA build's own wheels."
    return [f'{n}=={v}' for n, v in sorted(freeze.items()) if not _BUILD_SPECIFIC.match(n)]


def report_names(report: dict) -> set:
    "Canonical names of what a `pip install --dry-run --report` would install."
    return {canon(i['metadata']['name']) for i in report.get('install', [])}


def pins(freeze: dict, names: set) -> list:
    "The freeze's `name==version` for each of `names` that Colab has preinstalled."
    return [f'{n}=={freeze[n]}' for n in sorted(names) if n in freeze and not _BUILD_SPECIFIC.match(n)]


def install_args(notebook: dict, source: str) -> list:
    "pip's arguments in notebook 99's install cell (`%pip install …`), with `{PACKAGE}` replaced by `source`."
    for cell in notebook['cells']:
        src = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        m = re.search(r'^\s*%pip install (.+)$', src, re.M)
        if cell['cell_type'] == 'code' and m:
            return [a.replace('{PACKAGE}', source) for a in m.group(1).split()]
    raise ValueError("notebook has no `%pip install …` line in a code cell")


def snapshot() -> dict:
    "`{canonical name: version}` of the running interpreter's environment (the first one on sys.path wins)."
    from importlib.metadata import distributions
    seen = {}
    for d in distributions():
        seen.setdefault(canon(d.metadata['Name']), d.version)
    return seen


def diff(before: dict, after: dict) -> tuple:
    "(changed, added): packages present before whose version changed or that vanished, and new packages."
    changed = {n: (v, after.get(n)) for n, v in before.items() if after.get(n) != v}
    added = {n: v for n, v in after.items() if n not in before}
    return changed, added


def main(argv):
    cmd, *a = argv
    if cmd == 'constraints': print('\n'.join(constraints(parse_freeze(Path(a[0]).read_text()))))
    elif cmd == 'pins':
        names = set().union(*(report_names(json.loads(Path(r).read_text())) for r in a[1:]))
        print('\n'.join(pins(parse_freeze(Path(a[0]).read_text()), names)))
    elif cmd == 'install-args': print('\n'.join(install_args(json.loads(Path(a[0]).read_text()), a[1])))
    elif cmd == 'snapshot': Path(a[0]).write_text(json.dumps(snapshot(), indent=1, sort_keys=True))
    elif cmd == 'diff':
        changed, added = diff(*(json.loads(Path(p).read_text()) for p in a[:2]))
        allowed = {canon(n) for n in a[2:]}
        for n, (old, new) in sorted(changed.items()):
            print(f'{"changed (allowed)" if n in allowed else "CHANGED"} {n} {old} -> {new or "(removed)"}')
        print(f'added {len(added)} packages Colab does not have: ' + ' '.join(f'{n}=={v}' for n, v in sorted(added.items())))
        return 1 if set(changed) - allowed else 0
    else: raise SystemExit(f"unknown command {cmd!r}; see the module docstring")
    return 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
