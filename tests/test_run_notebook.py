"""Issue 5: `nbs/99_run_training.ipynb` executed headless (papermill) and driven in a real browser (JupyterLab +
headless Chromium via Playwright), both on ../shared/data/food-101-mini with a tiny CPU configuration."""
import json, os, re, shutil, signal, subprocess, sys, tarfile, time, urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / '99_run_training.ipynb'
MINI = ROOT.parent / 'shared' / 'data' / 'food-101-mini'
CHROMIUM = Path('/usr/bin/chromium')


def tiny_params(work: Path, autorun: bool, **kw) -> dict:
    "The tiny configuration: 1 epoch on 3 images per class, random init, CPU, no workers."
    return {**dict(data_dir=str(MINI), model_name='mobilenet_v2', epochs=1, batch_size=8, learning_rate=1e-3,
                   pretrained=False, mixed_precision=False, max_per_class=3, autorun=autorun, work_dir=str(work),
                   num_workers=0, download=False), **kw}


@pytest.fixture(autouse=True)
def _needs_data():
    if not MINI.is_dir(): pytest.skip(f"food-101-mini not found at {MINI}")


def _outputs(nb: dict):
    for c in nb['cells']:
        for o in c.get('outputs', []): yield c, o


def run_notebook(tmp_path: Path, params: dict, name: str = 'executed.ipynb') -> dict:
    "Execute notebook 99 with papermill; the executed notebook, checked for error outputs."
    import papermill as pm
    out = tmp_path / name
    pm.execute_notebook(str(NB), str(out), parameters=params, cwd=str(tmp_path), kernel_name='python3',
                        execution_timeout=900, progress_bar=False)
    nb = json.loads(out.read_text())
    errors = [o for _, o in _outputs(nb) if o['output_type'] == 'error']
    assert not errors, errors
    return nb


def _text(nb: dict) -> str:
    return ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/markdown', '')) for _, o in _outputs(nb))


def test_notebook_headless(tmp_path):
    "autorun=True: trains, shows curves, confusion matrix and predictions as images and the run id, exports the run's model."
    from mlflow import MlflowClient
    nb = run_notebook(tmp_path, tiny_params(tmp_path / 'work', autorun=True))
    pngs = [o for _, o in _outputs(nb) if 'image/png' in o.get('data', {})]
    # curves read back from MLflow, the confusion matrix, the top-3 prediction bars
    assert len(pngs) >= 3, f"expected >= 3 images, got {len(pngs)}"
    text = _text(nb)
    assert 'Test split:' in text and 'worst classes' in text, text[-2000:]
    assert 'Reliability: are the probabilities honest?' in text, text[-2000:]   # the reliability diagram is shown after training
    # the results are the run's own end-of-run evaluation, read back: no second pass over the test split (minutes on Food-101)
    ev = json.loads((tmp_path / 'work' / 'outputs' / 'v1' / 'evaluation.json').read_text())
    assert f"**Test split:** top-1 {ev['top1_accuracy']:.1%}" in text and "(the run's own end-of-run evaluation)" in text, text[-2000:]
    bars = [str(m['state'].get('value')) for m in nb['metadata']['widgets']['application/vnd.jupyter.widget-state+json']['state'].values()]
    assert not any(re.match(r'test\s+split', b) for b in bars), "the results evaluated the test split again"
    exported = list((tmp_path / 'work' / 'outputs' / 'v1').glob('*.torchscript.pt'))   # the export cell, on form.result
    assert len(exported) == 1 and f'wrote {exported[0]}' in text, text[-1500:]
    run_id = re.search(r'MLflow run id: ([0-9a-f]{32})', text).group(1)
    client = MlflowClient(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}")
    run = client.get_run(run_id)
    assert run.info.status == 'FINISHED'
    for k in ('train_loss', 'train_acc', 'val_loss', 'val_acc'):
        assert [m.step for m in client.get_metric_history(run_id, k)] == [1], k  # epochs count from 1


def test_notebook_twice_from_drive_archive(tmp_path):
    "use_drive: the archive in work_dir is extracted per session; two fresh runs in a row, then Resume continues the newest."
    from mlflow import MlflowClient
    work = tmp_path / 'drive'; work.mkdir()
    with tarfile.open(work / 'food-101.tar.gz', 'w:gz') as tf: tf.add(MINI / 'food-101', arcname='food-101')
    vm = lambda: tmp_path / 'vm' / 'data'   # the VM's local disk, lost on a reset
    params = tiny_params(work, autorun=True, use_drive=True, data_dir=str(vm()), download=True)  # offline: a download would fail
    runs = []
    for i in range(2):
        shutil.rmtree(tmp_path / 'vm', ignore_errors=True)          # a reset between the two sessions
        text = _text(run_notebook(tmp_path, params, f'run{i}.ipynb'))
        assert f"extracted {work / 'food-101.tar.gz'} into {vm()}" in text, text[:2000]
        runs.append(re.search(r'MLflow run id: ([0-9a-f]{32})', text).group(1))
    client = MlflowClient(f"sqlite:///{(work / 'mlflow.db').resolve()}")
    names = [client.get_run(r).info.run_name for r in runs]
    folders = sorted(p.parent.name for p in (work / 'checkpoints').glob('*/last.pth'))
    assert runs[0] != runs[1] and folders == sorted(names), (names, folders)   # one folder per run, named after it
    assert sorted(p.name for p in (work / 'outputs').iterdir()) == ['v1', 'v2']
    # a third session resumes: the newest run (the second) goes on to epoch 2, in its own MLflow run
    text = _text(run_notebook(tmp_path, {**params, 'resume': True, 'epochs': 2}, 'resume.ipynb'))
    assert f"using the dataset already in {vm()}" in text
    assert re.search(r'MLflow run id: ([0-9a-f]{32})', text).group(1) == runs[1]
    assert [m.step for m in client.get_metric_history(runs[1], 'val_acc')] == [1, 2]
    assert [m.step for m in client.get_metric_history(runs[0], 'val_acc')] == [1]


def test_install_cell_failure_is_clear(tmp_path):
    "The install cell as Colab runs it (google.colab imported), with a PACKAGE pip cannot install: pip's output and a clear error."
    import nbformat, papermill as pm
    cell = next(c for c in nbformat.read(str(NB), as_version=4).cells if '%pip install {PACKAGE}' in c.source)
    missing = tmp_path / 'nutrilearn_train-0.1.0-py3-none-any.whl'
    src = re.sub(r"^PACKAGE = .*$", f"PACKAGE = {str(missing)!r}", cell.source, count=1, flags=re.M)
    assert src != cell.source
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')"),
                                         nbformat.v4.new_code_cell(src)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, str(tmp_path / 'install.ipynb'))
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(tmp_path / 'install.ipynb'), str(tmp_path / 'out.ipynb'), kernel_name='python3', progress_bar=False)
    assert e.value.ename == 'RuntimeError' and f"pip could not install PACKAGE = '{missing}'" in e.value.evalue, e.value.evalue
    assert "git+https://github.com/YOU/nutrilearn_train@BRANCH" in e.value.evalue
    shown = _text(json.loads((tmp_path / 'out.ipynb').read_text()))
    assert 'ERROR' in shown and missing.name in shown, shown   # pip's own output stays visible


def _wait_http(url: str, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None: raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture
def jupyterlab(tmp_path):
    "A JupyterLab server on 127.0.0.1 serving `tmp_path`, stopped (whole process group) after the test."
    port, token = free_port(), 'nutrilearn-test'
    log = open(tmp_path / 'jupyterlab.log', 'wb')
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path}', '--ServerApp.port_retries=0',
           '--allow-root', '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path / '.jupyter'), 'JUPYTER_RUNTIME_DIR': str(tmp_path / '.runtime')}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        _wait_http(f'http://127.0.0.1:{port}/api/status?token={token}', 120, proc)
        yield f'http://127.0.0.1:{port}', token
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            if proc.poll() is not None: break
            os.killpg(proc.pid, sig)
            try: proc.wait(wait)
            except subprocess.TimeoutExpired: pass
        log.close()


def test_notebook_in_browser(tmp_path, jupyterlab):
    "JupyterLab + headless Chromium: run all, the form renders, click Train, the confusion matrix appears."
    if not CHROMIUM.exists():
        if os.environ.get('CI'): pytest.fail(f"{CHROMIUM} missing: .ci/run must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")
    import papermill as pm
    from playwright.sync_api import sync_playwright, expect
    pm.execute_notebook(str(NB), str(tmp_path / 'run.ipynb'), parameters=tiny_params(tmp_path / 'work', autorun=False),
                        prepare_only=True)
    base, token = jupyterlab
    shot = tmp_path / 'notebook.png'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
            '--disable-component-update', '--disable-sync'])
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            page.goto(f'{base}/lab/tree/run.ipynb?token={token}', timeout=120_000)
            page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=120_000)
            expect(page.get_by_text('Python 3 (ipykernel) | Idle')).to_be_visible(timeout=120_000)  # kernel up
            page.get_by_role('menuitem', name='Run', exact=True).click()
            page.locator('li[data-command="runmenu:run-all"]').click()
            train = page.locator('.jupyter-widgets button', has_text='Train')
            expect(train).to_be_visible(timeout=180_000)
            expect(page.get_by_label('Backbone', exact=True)).to_have_value('mobilenet_v2')
            expect(page.get_by_label('Recipe', exact=True)).to_be_visible()
            expect(page.locator('.jp-OutputArea-output pre', has_text='Press Train above to start.')).to_be_visible(timeout=120_000)
            train.click()
            # the results land in the form's output area: curves, then the confusion matrix, then predictions
            results = page.locator('.jupyter-widgets.widget-output')
            expect(results.get_by_text('Test split:', exact=True)).to_be_visible(timeout=600_000)   # not the progress bar's 'test split: 100%'
            expect(results.locator('img.widget-image')).to_have_count(1)    # the live chart
            out_imgs = results.locator('.jp-RenderedImage img')
            expect(out_imgs.nth(2)).to_be_visible(timeout=120_000)   # curves, confusion matrix, predictions
            expect(results.get_by_text('MLflow run', exact=False).first).to_be_visible(timeout=60_000)
            cm = out_imgs.nth(1)
            cm.scroll_into_view_if_needed()
            box = cm.bounding_box()
            assert box and box['width'] > 300 and box['height'] > 300, box
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / 'failure.png'), full_page=True)
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}\nJupyterLab log:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert list((tmp_path / 'work' / 'outputs').glob('v1/food_model_v1.pth'))
