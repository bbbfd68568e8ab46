"""Run notebook 99 headless in the Colab-like environment and check its widgets at the protocol level.

Called by tests/colab_env.sh with that environment's python (Python 3.13, ipywidgets 7.7.1, torch 2.11, …):
papermill executes the notebook with autorun (Train through `form.submit()`) on food-101-mini with tiny settings;
nbclient records every widget model the kernel opened (comm_open + updates) in the notebook's widget-state metadata,
which is exactly what a frontend receives. Checks: every model is a stock ipywidgets 7 model (`@jupyter-widgets/
controls` 1.5.0, `base` 1.2.0, `output` 1.0.0) whose state serialises as JSON, every displayed view points at a known
model, the form's widgets are all there, training ran, and the curves, confusion matrix and predictions arrive as PNGs.
Then, in the same kernel, Train is pressed the way a frontend presses it (a `comm_msg` carrying the button's `click`
event), so a second fresh run goes through the button handler and the form's Output widget: it must finish as its own
MLflow run, with its PNGs captured by the Output widget.
`--unit NB...` also runs those notebooks' own test cells there (as nbdev_test would: flagged cells and the export cell
left out), e.g. the form's tests on ipywidgets 7.
"""
import argparse, base64, json, re, sys, time
from pathlib import Path

# The model modules and versions ipywidgets 7.x speaks (ipywidgets 8 uses controls/base 2.0.0): what Colab's
# built-in widget manager renders.
IPYWIDGETS7_MODULES = {'@jupyter-widgets/controls': '1.5.0', '@jupyter-widgets/base': '1.2.0', '@jupyter-widgets/output': '1.0.0'}
FORM_MODELS = {'DropdownModel', 'BoundedIntTextModel', 'FloatLogSliderModel', 'CheckboxModel', 'TextModel', 'HTMLModel',
               'ButtonModel', 'OutputModel', 'VBoxModel', 'ImageModel'}
PNG = b'\x89PNG\r\n\x1a\n'


def widget_problems(nb: dict) -> list:
    "What is wrong with the widgets recorded in an executed notebook (empty: nothing)."
    state = nb.get('metadata', {}).get('widgets', {}).get('application/vnd.jupyter.widget-state+json', {}).get('state', {})
    if not state: return ['no widget state recorded: the notebook created no widgets, or the kernel sent none']
    bad = []
    for mid, m in state.items():
        for kind in ('model', 'view'):
            mod, ver = m['state'].get(f'_{kind}_module'), m['state'].get(f'_{kind}_module_version')
            if kind == 'view' and mod is None: continue   # models without views (layouts, styles)
            if IPYWIDGETS7_MODULES.get(mod) != ver:
                bad.append(f"{m['model_name']} {mid}: {kind} module {mod} {ver} is not ipywidgets 7's")
        try: json.dumps(m['state'])
        except TypeError as e: bad.append(f"{m['model_name']} {mid}: state does not serialise ({e})")
    missing = FORM_MODELS - {m['model_name'] for m in state.values()}
    if missing: bad.append(f"the form's widgets are missing: {sorted(missing)}")
    views = [o['data']['application/vnd.jupyter.widget-view+json'] for c in nb['cells'] for o in c.get('outputs', [])
             if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]
    if not views: bad.append('no widget was displayed')
    bad += [f"view of unknown model {v['model_id']}" for v in views if v['model_id'] not in state]
    bad += [f"view protocol {v.get('version_major')}.x is not 2.x" for v in views if v.get('version_major') != 2]
    charts = [m for m in state.values() if m['model_name'] == 'ImageModel']
    if not any(base64.b64decode(b['data'])[:8] == PNG for m in charts for b in m.get('buffers', [])):
        bad.append('the live chart (an Image widget) never received a PNG')
    return bad


def output_problems(nb: dict) -> list:
    "What is missing from an executed notebook's outputs after Train: errors, the run id, the result PNGs."
    outs = [o for c in nb['cells'] for o in c.get('outputs', [])]
    bad = [f"error output: {o['ename']}: {o['evalue']}" for o in outs if o['output_type'] == 'error']
    text = ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/markdown', '')) for o in outs)
    if not re.search(r'MLflow run id: [0-9a-f]{32}', text): bad.append('Train did not finish (no "MLflow run id:" line)')
    if 'Test split:' not in text: bad.append('no test-split evaluation shown')
    pngs = [base64.b64decode(o['data']['image/png']) for o in outs if 'image/png' in o.get('data', {})]
    if len(pngs) < 3 or not all(p[:8] == PNG for p in pngs):
        bad.append(f"expected >= 3 PNG outputs (curves, confusion matrix, predictions), got {len(pngs)}")
    return bad


RUN_ID = re.compile(r'MLflow run id: ([0-9a-f]{32})')


def _click_train(client, nb, timeout: float) -> list:
    "Send the comm message a frontend sends when Train is clicked, handle the replies as a frontend would; problems."
    import nbformat
    from nbclient.exceptions import CellExecutionComplete
    from nbclient.util import run_sync
    ids = [k for k, s in client.widget_state.items() if s.get('_model_name') == 'ButtonModel' and s.get('description') == 'Train']
    if len(ids) != 1: return [f"expected one Train button, found {len(ids)}"]
    cell = nbformat.v4.new_code_cell('# Train, clicked through the widget protocol', metadata={'execution': {}})
    nb.cells.append(cell)
    msg = client.kc.session.msg('comm_msg', {'comm_id': ids[0], 'data': {'method': 'custom', 'content': {'event': 'click'}}})
    client.kc.shell_channel.send(msg)
    deadline = time.monotonic() + timeout
    while True:
        try: m = run_sync(client.kc.get_iopub_msg)(timeout=max(1, deadline - time.monotonic()))
        except Exception: return ['the click did not finish in time']
        if m['parent_header'].get('msg_id') != msg['header']['msg_id']: continue
        try: client.process_message(m, cell, len(nb.cells) - 1)
        except CellExecutionComplete: break
    return []


def click_problems(nb: dict) -> list:
    "What is wrong after the protocol click: the second run's result, captured by the form's Output widget."
    state = nb['metadata']['widgets']['application/vnd.jupyter.widget-state+json']['state'].values()
    outs = [o for m in state if m['model_name'] == 'OutputModel' for o in m['state'].get('outputs', [])]
    text = ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/markdown', '')) for o in outs)
    bad = [f"the form shows an error: {m['state']['value']}" for m in state if m['model_name'] == 'HTMLModel'
           and re.search(r'Could not train|Nothing to resume|Invalid setting', str(m['state'].get('value')))]
    first = RUN_ID.findall(''.join(''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', [])))
    second = RUN_ID.findall(text)
    if not second: bad.append("the click's training did not finish in the form's Output widget (no run id there)")
    elif second[-1] in first: bad.append(f"the click reused run {second[-1]} instead of starting a new one")
    pngs = [o for o in outs if 'image/png' in o.get('data', {})]
    if len(pngs) < 3: bad.append(f"the form's Output widget got {len(pngs)} PNGs after the click, expected >= 3")
    print(f"run by form.submit(): {first[-1] if first else None}; run by the click: {second[-1] if second else None} "
          f"({len(pngs)} PNGs in the form's Output widget)")
    return bad


def run_and_click(path: str, params: dict, work: Path, timeout: int = 900) -> tuple:
    "Execute the notebook with `params` (papermill's parameter injection), then click Train; (notebook, problems)."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    nb = parameterize_notebook(load_notebook_node(path), params)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(work)}})
    with client.setup_kernel():
        info = client.wait_for_reply(client.kc.kernel_info())
        nb.metadata['language_info'] = info['content']['language_info']
        try:
            for i, cell in enumerate(nb.cells): client.execute_cell(cell, i)
        except CellExecutionError as e: return nb, [f"notebook 99 raised: {str(e).strip().splitlines()[-1]}"]
        problems = _click_train(client, nb, timeout)
        client.set_widgets_metadata()
    nbformat.write(nb, str(work / 'executed.ipynb'))
    return nb, problems


SKIP_FLAGS = ('#| slow', '#| cuda', '#| notest', '#| eval: false', 'nbdev_export(')


def run_unit_notebook(path: Path, work: Path) -> list:
    "Execute `path`'s cells as nbdev_test would (no flagged cells, no export cell); the problems found."
    import nbformat, papermill as pm
    nb = nbformat.read(str(path), as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type != 'code' or not any(f in c.source for f in SKIP_FLAGS)]
    src, out = work / f'unit-{path.name}', work / f'unit-{path.stem}.out.ipynb'
    nbformat.write(nb, str(src))
    try: pm.execute_notebook(str(src), str(out), cwd=str(work), kernel_name='python3', execution_timeout=600, progress_bar=False)
    except pm.PapermillExecutionError as e: return [f"{path.name}: cell {e.exec_count} failed: {e.ename}: {e.evalue}"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--notebook', required=True); p.add_argument('--data', required=True); p.add_argument('--work', required=True)
    p.add_argument('--unit', nargs='*', default=[], help="notebooks whose test cells to run here too")
    a = p.parse_args(argv)
    import ipywidgets, papermill as pm, torch
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, ipywidgets {ipywidgets.__version__}", flush=True)
    if not ipywidgets.__version__.startswith('7.'):
        print(f"FAILED: this environment has ipywidgets {ipywidgets.__version__}, not Colab's 7.x"); return 1
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    params = dict(data_dir=a.data, model_name='mobilenet_v2', epochs=1, batch_size=8, learning_rate=1e-3, pretrained=False,
                  mixed_precision=False, max_per_class=3, autorun=True, download=False, work_dir=str(work / 'work'), num_workers=0)
    t0 = time.monotonic()
    nb, bad = run_and_click(a.notebook, params, work)
    if bad:
        for b in bad: print(f"FAILED: {b}")
        return 1
    nb = json.loads(json.dumps(nb))   # plain dicts, as a saved notebook
    bad = output_problems(nb) + widget_problems(nb) + click_problems(nb)
    kernel_py = nb['metadata'].get('language_info', {}).get('version', '?')
    if kernel_py.split('.')[:2] != sys.version.split('.')[:2]: bad.append(f"the kernel ran Python {kernel_py}, not this environment's")
    for u in a.unit:
        t1 = time.monotonic(); found = run_unit_notebook(Path(u), work); bad += found
        print(f"{Path(u).name}: test cells {'failed' if found else 'passed'} ({time.monotonic() - t1:.0f} s)")
    state = nb['metadata']['widgets']['application/vnd.jupyter.widget-state+json']['state']
    print(f"notebook 99 ran and was clicked in {time.monotonic() - t0:.0f} s; {len(state)} widget models: "
          + ', '.join(sorted({m['model_name'] for m in state.values()})))
    for b in bad: print(f"FAILED: {b}")
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
