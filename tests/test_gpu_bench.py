"""Issue 12 item 6: `bench/gpu_throughput.py` runs end to end on the CPU (a smoke run: its numbers mean nothing) and
keeps what it measured when it is cut short. The GPU run itself is for the GPU machine (see the README)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
MINI = REPO.parent / 'shared/data/food-101-mini'
KEYS = ('ceiling', 'cpu_pipeline', 'gpu_pipeline', 'cpu_pipeline_2workers', 'gpu_pipeline_2workers')


def bench(out, *extra):
    cmd = [sys.executable, 'bench/gpu_throughput.py', '--src', str(MINI), '--out', str(out), '--device', 'cpu',
           '--models', 'mobilenet_v2', '--batch-size', '4', '--image-size', '32', '--workers', '1', '--warmup', '1',
           '--epoch-images', '200', *extra]
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_WAIT_POLICY': 'PASSIVE'}
    return cmd, env


@pytest.fixture(autouse=True)
def need_mini():
    if not (MINI / 'food-101/images').is_dir(): pytest.skip(f"the Food-101 sample is missing at {MINI}")


def test_cpu_smoke_run_writes_the_full_json(tmp_path):
    cmd, env = bench(tmp_path, '--seconds', '0.3')
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [f] = tmp_path.glob('cpu-*.json')
    d = json.loads(f.read_text())
    res = d['results']['mobilenet_v2']
    assert all(res[k] > 0 for k in KEYS) and set(res['ratios']) == {'gpu_over_ceiling', 'gpu_over_cpu', 'gpu_2w_over_cpu_2w'}
    assert d['pipeline_only']['all_workers'] > 0 and d['pipeline_only']['2workers'] > 0
    assert d['train_epoch']['model'] == 'mobilenet_v2' and d['train_epoch']['images_per_s'] > 0
    assert d['complete'] and d['settings']['smoke'] and d['versions']['torch'] and d['versions']['torchvision']


def test_a_run_cut_short_keeps_what_it_measured(tmp_path):
    cmd, env = bench(tmp_path, '--seconds', '30')
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, d = time.monotonic() + 240, {}
        while time.monotonic() < deadline and not d.get('pipeline_only'):
            time.sleep(1)
            f = next(tmp_path.glob('cpu-*.json'), None)
            if f is not None: d = json.loads(f.read_text())   # written atomically: always whole JSON
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert d.get('pipeline_only', {}).get('all_workers', 0) > 0 and d['complete'] is False

