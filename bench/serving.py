"""Issue 10 closing numbers: the cost of the end-of-training test evaluation on food-101-mini, and one-image latency of
`mlflow models serve` (the registered pyfunc, HTTP round trip) next to `Predictor.predict` in process.

Not a test. Run: `python bench/serving.py [--requests 20]` (CPU, ~2 min). It trains mobilenet_v2 for one epoch on
3 images per class (as `--max-per-class 3`), reads the evaluation time the run printed, times the same evaluation on the
full 150-image test split, then serves `models:/<name>@champion` and times 20 single-image requests (after 3 warm-ups).
"""
import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import argparse, dataclasses, json, re, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def p50(xs): return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--requests', type=int, default=20); a = ap.parse_args()
    import torch
    from nutrilearn_train import tracking
    from nutrilearn_train.config import TrainingConfig
    from nutrilearn_train.inference import Predictor
    from nutrilearn_train.persistence import load_model_config, load_saved_model
    from nutrilearn_train.serving import serving_request
    from nutrilearn_train.train import _evaluate_test
    d = Path(tempfile.mkdtemp(prefix='bench-serving-')); uri, name = f"sqlite:///{d}/mlflow.db", 'bench-serving'
    args = [BIN/'nutrilearn-train', '--data-dir', DATA, '--no-pretrained', '--max-per-class', '3', '--epochs', '1', '--batch-size', '8',
            '--num-workers', '0', '--device', 'cpu', '--checkpoint-dir', d/'ck', '--output-dir', d/'out', '--tracking-uri', uri,
            '--experiment-name', name, '--registered-model-name', name, '--promote', 'always']
    t0 = time.perf_counter(); r = subprocess.run([str(x) for x in args], capture_output=True, text=True, cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    total = time.perf_counter() - t0
    m = re.search(r'test split \((\d+) images\).*\(([\d.]+)s\)', r.stdout)
    print(f"training run (--max-per-class 3, 1 epoch): {total:.1f} s in all; test evaluation of {m.group(1)} images: {m.group(2)} s")

    mc = load_model_config(d/'out'); model = load_saved_model(d/'out/v1'/mc['weights_file'], mc)
    c2i = {c: i for i, c in enumerate(mc['class_names'])}
    cfg = TrainingConfig(data_dir=str(DATA), num_workers=0, batch_size=32, tracking_uri=uri, num_classes=len(c2i))
    (d/'full').mkdir()
    res = _evaluate_test(model, cfg, c2i, d/'full', 'cpu')
    print(f"test evaluation on the full test split ({res['n']} images, batch 32, CPU): {res['seconds']:.1f} s")

    photo = sorted((DATA/'food-101/images').glob('*/*.jpg'))[0]
    pred = Predictor.from_registry(f'models:/{name}@champion', tracking_uri=uri, device='cpu')
    for _ in range(3): pred.predict(photo)
    local = []
    for _ in range(a.requests):
        t = time.perf_counter(); pred.predict(photo); local.append(1000 * (time.perf_counter() - t))

    port = free_port()
    log = open(d/'serve.log', 'w')
    proc = subprocess.Popen([str(BIN/'mlflow'), 'models', 'serve', '-m', f'models:/{name}@champion', '--env-manager', 'local',
                             '--host', '127.0.0.1', '--port', str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=d,
                            env={**os.environ, 'MLFLOW_TRACKING_URI': uri}, start_new_session=True)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/ping', timeout=2): break
            except OSError:
                assert proc.poll() is None and time.perf_counter() - t0 < 180, (d/'serve.log').read_text()[-2000:]
                time.sleep(0.3)
        ready = time.perf_counter() - t0
        body = json.dumps(serving_request([photo], 3)).encode()
        def call():
            req = urllib.request.Request(f'http://127.0.0.1:{port}/invocations', body, {'Content-Type': 'application/json'})
            with urllib.request.urlopen(req, timeout=60) as resp: return json.loads(resp.read())
        for _ in range(3): call()
        served = []
        for _ in range(a.requests):
            t = time.perf_counter(); call(); served.append(1000 * (time.perf_counter() - t))
    finally:
        os.killpg(proc.pid, signal.SIGTERM); proc.wait(30)
    print(f"mlflow models serve: ready in {ready:.1f} s; one image, p50 of {a.requests}: {p50(served):.1f} ms "
          f"(min {min(served):.1f}, max {max(served):.1f})")
    print(f"Predictor.predict (same registered model, in process): p50 of {a.requests}: {p50(local):.1f} ms "
          f"(min {min(local):.1f}, max {max(local):.1f})")


if __name__ == '__main__': main()
