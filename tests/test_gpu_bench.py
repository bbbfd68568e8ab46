"""Issue 23 item 4: `bench/gpu_check.sh` — the GPU tests, then `bench/gpu_throughput.py` — runs end to end on the CPU in
smoke mode with the tracking and notebook stack made uninstalled (as on a bare GPU machine), so it can never crash on
import again; the benchmark keeps what it measured when it is cut short; "all usable cores" means the CPUs this process
may use. The GPU run itself is for the GPU machine (see the README)."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

from test_bare_install import BLOCKED

REPO = Path(__file__).parents[1]
MINI = REPO.parent / 'shared/data/food-101-mini'
BARE = BLOCKED + ('hypothesis', 'nbformat', 'jupyter_client')   # not on a bare GPU machine either
SITECUSTOMIZE = textwrap.dedent('''
    import os, sys
    for name in os.environ.get('NUTRILEARN_BLOCK', '').split(','):
        if name: sys.modules[name] = None   # `import name` raises ModuleNotFoundError, as for a package not installed
''')


@pytest.fixture(autouse=True)
def need_mini():
    if not (MINI / 'food-101/images').is_dir(): pytest.skip(f"the Food-101 sample is missing at {MINI}")


def bare_env(tmp_path) -> dict:
    "An environment in which every Python started (by the script, pytest, the DataLoader workers) lacks the packages in `BARE`."
    shim = tmp_path / 'shim'; shim.mkdir(exist_ok=True); (shim / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    return {**os.environ, 'PYTHONPATH': str(shim), 'NUTRILEARN_BLOCK': ','.join(BARE), 'NUTRILEARN_MINI': str(MINI),
            'PYTHON': sys.executable, 'OMP_WAIT_POLICY': 'PASSIVE'}


def test_the_blocker_blocks(tmp_path):
    "The environment the smoke run gets really hides the tracking stack (so the next test can fail)."
    r = subprocess.run([sys.executable, '-c', 'import mlflow'], env=bare_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'import of mlflow halted; None in sys.modules' in r.stderr, r.stderr


def test_gpu_check_smoke_runs_bare_and_writes_the_full_json(tmp_path):
    out = tmp_path / 'results'
    r = subprocess.run(['bash', 'bench/gpu_check.sh', '--smoke', '--out', str(out)], cwd=REPO, env=bare_env(tmp_path),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert '1 skipped' in r.stdout and 'SMOKE RUN' in r.stdout and 'images/s' in r.stdout   # test_cuda.py collected, skipped
    [f] = out.glob('cpu-*.json')
    d = json.loads(f.read_text())
    assert d['complete'] and d['smoke'] and d['skipped'] == [] and 'exit 0' in d['gpu_tests'] and '1 skipped' in d['gpu_tests']
    g = d['gpu_pipeline']   # what was measured: the probe ran, strict decoding, every image decoded by the "device"
    assert g['probe'] == 'passed' and g['strict_decode'] and g['decoded']['device'] > 0 and not g['decoded'].get('pil')
    assert g['measured'].startswith('cpu decoder: 100.0 % of the images')
    assert set(d['pipeline_only']) == {'gpu_all', 'gpu_2w', 'cpu_all', 'cpu_2w'} and all(v > 0 for v in d['pipeline_only'].values())
    for m in ('mobilenet_v2', 'efficientnet_b0', 'resnet50'):
        assert set(d['results'][m]['compile']) == {'ceiling', 'gpu_all'}
        assert set(d['results'][m]['eager']) == ({'ceiling', 'gpu_all', 'gpu_2w', 'cpu_all', 'cpu_2w'} if m == 'mobilenet_v2' else {'ceiling', 'gpu_all'})
    assert len(d['targets']) == 8 and all(t['value'] is not None and t['met'] is None for t in d['targets'])   # smoke: not judged
    s = d['settings']
    assert (s['cpus_usable'], s['amp'], s['grad_scaler']) == (len(os.sched_getaffinity(0)), 'None', False)
    assert d['versions']['torch'] and d['versions']['torchvision']


def test_usable_cores_are_the_affinity_not_the_machine():
    "Restricted to one CPU (as a container or taskset can be), the benchmark's default worker count is 1, whatever os.cpu_count() says."
    code = ("import os, runpy; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "g = runpy.run_path('bench/gpu_throughput.py'); print(g['usable_cpus'](), os.cpu_count())")
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    usable, total = map(int, r.stdout.split())
    assert usable == 1 and total == os.cpu_count()


def test_a_run_cut_short_keeps_what_it_measured(tmp_path):
    cmd = [sys.executable, 'bench/gpu_throughput.py', '--src', str(MINI), '--out', str(tmp_path), '--smoke', '--seconds', '30']
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO), 'OMP_WAIT_POLICY': 'PASSIVE'},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, d = time.monotonic() + 240, {}
        while time.monotonic() < deadline and not d.get('pipeline_only'):
            time.sleep(1)
            f = next(tmp_path.glob('cpu-*.json'), None)
            if f is not None: d = json.loads(f.read_text())   # written atomically: always whole JSON
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert d.get('pipeline_only', {}).get('gpu_all', 0) > 0 and d['complete'] is False and d['gpu_pipeline']['probe'] == 'passed'
