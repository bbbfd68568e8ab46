#!/usr/bin/env bash
# The Colab-like environment check: a Python 3.13 virtual environment with every package we (or our dependencies,
# or the notebook's kernel) touch pinned to what a Colab GPU runtime has preinstalled; the package installed exactly
# as notebook 99's install cell does it; fail if pip changed a preinstalled package or `pip check` complains; then
# run notebook 99 headless there and check its widgets at protocol level (tests/colab_notebook_check.py).
#
#   tests/colab_env.sh [SOURCE_DIR]   # default: this checkout (tracked + untracked-but-not-ignored files)
#
# The pinned environment is cached under ~/.cache/nutrilearn/ (NUTRILEARN_CACHE), keyed by the freeze, the package's
# requirements and a recipe number; each check runs in a hard-linked copy of it, so the cache is never modified.
# NUTRILEARN_COLAB_MODE=install stops after the install check (no notebook run).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
src=$(cd "${1:-$root}" && pwd)
freeze=${NUTRILEARN_COLAB_FREEZE:-$root/../shared/colab/pip-freeze.gpu.txt}
mini=${NUTRILEARN_MINI:-$root/../shared/data/food-101-mini}
cache=${NUTRILEARN_CACHE:-$HOME/.cache/nutrilearn}
mode=${NUTRILEARN_COLAB_MODE:-full}
fail() { echo "colab_env: FAILED: $*" >&2; exit 1; }
t0=$SECONDS; phase() { echo "== colab_env [$((SECONDS - t0)) s] $*"; }
unset PYTHONPATH VIRTUAL_ENV PIP_REQUIRE_VIRTUALENV

# Colab runs Python 3.13; a check on another version would test something else, so no fallback and no skip.
py=${NUTRILEARN_PY313:-}
if [ -z "$py" ]; then
  for c in /root/.pyenv/versions/3.13*/bin/python3 "$(command -v python3.13 || true)"; do [ -x "$c" ] && { py=$c; break; }; done
fi
[ -n "$py" ] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null || fail \
  "no Python 3.13 found (Colab's version). Install one (e.g. 'pyenv install 3.13') or set NUTRILEARN_PY313=/path/to/python3.13"
[ -f "$freeze" ] || fail "Colab's pip freeze not found at $freeze (set NUTRILEARN_COLAB_FREEZE)"
[ "$mode" = install ] || [ -d "$mini" ] || fail "food-101-mini not found at $mini (set NUTRILEARN_MINI)"
helper() { "$py" "$here/colab_env.py" "$@"; }

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# What `pip install git+URL` would see: the repository's files, not build leftovers or ignored local state.
mkdir "$work/src"; (cd "$src" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work/src"
helper constraints "$freeze" > "$work/constraints.txt"
tools="papermill grpcio-status ipykernel"   # the kernel Colab runs the notebook in, and protobuf's strictest user
recipe=1   # bump when the way the environment is built changes
key=$( { cat "$freeze"; grep -E '^(requirements|min_python) *=' "$src/settings.ini"; echo "$tools $recipe"; "$py" -V; } | sha256sum | cut -c1-16)
base=$cache/colab-env-$key

if [ -x "$base/bin/python" ]; then
  phase "cached Colab-pinned environment $base"
else
  phase "building the Colab-pinned environment (first run for these requirements; cached afterwards)"
  mkdir -p "$cache"
  # Which of Colab's packages can the install touch? Everything the package, the kernel and grpcio-status would pull
  # in, resolved both freely (what pip picks on a bare machine) and against Colab's versions.
  "$py" -m pip install -q --dry-run --ignore-installed --report "$work/free.json" "$work/src" $tools > "$work/resolve.log" 2>&1 \
    || { tail -20 "$work/resolve.log"; fail "pip cannot resolve the package's requirements at all"; }
  "$py" -m pip install -q --dry-run --ignore-installed --report "$work/colab.json" -c "$work/constraints.txt" "$work/src" $tools \
    > "$work/resolve.log" 2>&1 || { echo "(the package's requirements cannot be met with Colab's versions; the install check below shows what pip changes)"; echo '{}' > "$work/colab.json"; }
  helper pins "$freeze" "$work/free.json" "$work/colab.json" > "$work/pins.txt"
  echo "pinning $(wc -l < "$work/pins.txt") of Colab's packages: $(tr '\n' ' ' < "$work/pins.txt" | cut -c1-400)…"
  tmp=$base.tmp.$$; rm -rf "$tmp"
  "$py" -m venv "$tmp"
  pipv=$(grep -E '^pip==' "$freeze" || true)
  "$tmp/bin/python" -m pip install -q ${pipv:+"$pipv"} > "$work/base.log" 2>&1
  "$tmp/bin/python" -m pip install -q -c "$work/constraints.txt" -r "$work/pins.txt" papermill >> "$work/base.log" 2>&1 \
    || { tail -30 "$work/base.log"; rm -rf "$tmp"; fail "could not build the Colab-pinned environment"; }
  cp "$work/pins.txt" "$tmp/colab-pins.txt"
  mv -T "$tmp" "$base" 2>/dev/null || rm -rf "$tmp"   # another run may have finished the same build first
  ls -dt "$cache"/colab-env-* 2>/dev/null | grep -v '\.tmp\.' | tail -n +3 | xargs -r rm -rf   # keep the newest two
  phase "built $base"
fi

env=$work/env; cp -al "$base" "$env"   # hard links: pip replaces files (unlink + write), so the cache stays intact
# Always `python -m …` here: console scripts' shebangs point at the folder the environment was built in.
envpy=$env/bin/python
"$envpy" "$here/colab_env.py" snapshot "$work/before.json"
"$envpy" -m pip check > "$work/check0.log" 2>&1 || { cat "$work/check0.log"; fail "the Colab-pinned environment is inconsistent before installing anything"; }

mapfile -t args < <(helper install-args "$src/nbs/99_run_training.ipynb" "$work/src")
phase "installing as notebook 99 does: pip install ${args[*]}"
"$envpy" -m pip install "${args[@]}" > "$work/install.log" 2>&1 || { tail -40 "$work/install.log"; fail "pip install failed"; }
"$envpy" "$here/colab_env.py" snapshot "$work/after.json"
# Allowed to change, and why: certifi is Mozilla's CA bundle (data only; nothing in Colab caps it), and the newest
# databricks-sdk, which mlflow-skinny requires, needs a newer certifi than Colab's freeze has.
allowed="certifi"
changed=0; helper diff "$work/before.json" "$work/after.json" $allowed || changed=1
broken=0; "$envpy" -m pip check || broken=1
[ $changed = 0 ] || fail "installing the package changed packages Colab has preinstalled (CHANGED above): Colab users would get a broken or restarted runtime"
[ $broken = 0 ] || fail "pip check found broken requirements after installing the package (listed above)"
phase "install check passed: no preinstalled package changed (except: $allowed), pip check clean"
[ "$mode" = install ] && exit 0

# The UI notebooks' own tests use fastcore's test helpers: Colab's version (constrained to the freeze).
"$envpy" -m pip install -q -c "$work/constraints.txt" fastcore > "$work/fastcore.log" 2>&1 || { tail "$work/fastcore.log"; fail "could not install fastcore"; }
# JUPYTER_PATH first: the kernel must be this environment's python, whatever kernels the user has installed.
JUPYTER_PATH=$env/share/jupyter PYDEVD_DISABLE_FILE_VALIDATION=1 "$envpy" "$here/colab_notebook_check.py" --notebook "$src/nbs/99_run_training.ipynb" --data "$mini" \
  --work "$work/nb" --unit "$src/nbs/06_ui.ipynb" "$src/nbs/06a_colab.ipynb"
phase "Colab-like check passed"
