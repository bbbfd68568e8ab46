"""Issue 12 item 4: the data modules, the models and the training loop work where only torch, torchvision, numpy,
Pillow, pytest and hypothesis are installed (a bare GPU machine), so `tests/test_cuda.py` and the benchmark run there.

A subprocess makes the tracking, notebook and UI stack look uninstalled (`sys.modules[name] = None`: `import name`
raises ModuleNotFoundError and `importlib.util.find_spec(name)` answers None, as for a missing package), imports the modules, runs a tiny `fit` (train_epoch, validate_epoch, checkpoints) with the null tracker and a
`train(cfg)` on a few real JPEGs with the in-memory tracker.
"""
import os, subprocess, sys, textwrap
from pathlib import Path

BLOCKED = ('mlflow', 'nbdev', 'ipywidgets', 'fastcore', 'execnb', 'IPython', 'tqdm', 'matplotlib', 'sklearn', 'scipy',
           'pandas', 'onnx', 'onnxruntime', 'papermill')

SCRIPT = textwrap.dedent('''
    import sys, tempfile, warnings
    from pathlib import Path
    BLOCKED = set(sys.argv[1].split(','))
    for name in BLOCKED: sys.modules[name] = None
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from nutrilearn_train import config, data, gpu_data, models, train
    assert all(sys.modules[n] is None for n in BLOCKED), [n for n in BLOCKED if sys.modules[n] is not None]
    models.build_model('mobilenet_v2', 3, pretrained=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g); y = x.mean((2, 3)).argmax(1)
    mk = lambda s, sh: data.make_loader(TensorDataset(x[s], y[s]), 4, shuffle=sh, seed=0, image_size=8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with tempfile.TemporaryDirectory() as d:
        cfg = config.TrainingConfig(num_classes=3, epochs=2, checkpoint_dir=d + '/ck', output_dir=d + '/out',
                                    tracking_uri='sqlite:////unused/mlflow.db')
        res = train.fit(net, mk(slice(0, 16), True), mk(slice(16, 24), False), cfg, progress=True)
    assert len(res['history']) == 2 and all(r['train_loss'] == r['train_loss'] for r in res['history']), res
    from PIL import Image
    from nutrilearn_train.tracking import InMemoryTracker
    with tempfile.TemporaryDirectory() as d:   # train() end to end: real JPEGs, the CPU pipeline, an in-memory tracker
        for i in range(8): (Path(d)/'data'/f'c{i % 2}').mkdir(parents=True, exist_ok=True); Image.new('RGB', (40, 30), (30 * i, 80, 0)).save(Path(d)/'data'/f'c{i % 2}/{i}.jpg')
        cfg = config.TrainingConfig(data_dir=d + '/data', model_name='mobilenet_v2', pretrained=False, epochs=1, batch_size=2,
                                    num_workers=0, checkpoint_dir=d + '/ck', output_dir=d + '/out', tracking_uri='sqlite:////unused/mlflow.db')
        out = train.train(cfg, InMemoryTracker(), progress=True)
        assert len(out['history']) == 1 and Path(out['model_dir']).is_dir(), out
    pipe = gpu_data.GPUBatchPipeline(True, 'cpu', image_size=16, resize=18)
    xb, _ = pipe([torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)])
    assert xb.shape == (1, 3, 16, 16)
    print('bare ok', sorted(m for m in sys.modules if m.split('.')[0] == 'nutrilearn_train'))
''')


def test_core_modules_run_without_the_tracking_and_notebook_stack(tmp_path):
    env = {**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE', 'PYTHONPATH': str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, '-c', SCRIPT, ','.join(BLOCKED)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert 'bare ok' in r.stdout and 'nutrilearn_train.train' in r.stdout and 'nutrilearn_train.tracking' in r.stdout


def test_the_blocker_really_blocks(tmp_path):
    "The same finder makes an import of a blocked package fail (so the test above can fail)."
    probe = SCRIPT.split('import torch')[0] + 'import mlflow\n'
    r = subprocess.run([sys.executable, '-c', probe, 'mlflow'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ModuleNotFoundError: import of mlflow halted; None in sys.modules" in r.stderr, r.stderr
