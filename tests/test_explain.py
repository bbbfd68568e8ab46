"""Issue 14, Grad-CAM and the galleries: map shape and range (hypothesis), the map's mass on the evidence of a model trained
to look at one quadrant, all three registry backbones, and a real `nutrilearn-train` run whose test evaluation writes and
logs `misclassified.png` / `top_losses.png`, then `nutrilearn-predict --explain` on its model."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch import nn

from nutrilearn_train.explain import cam_layer, grad_cam, quadrant_images, top_losses
from nutrilearn_train.models import BACKBONES, build_model

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()


NET = small_net()


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 3), st.integers(4, 40), st.integers(4, 40), st.integers(0, 2**16), st.sampled_from([None, 0, 1, 2]))
def test_map_has_input_shape_and_lies_in_unit_interval(b, h, w, seed, cls):
    xb = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    cam = grad_cam(NET, xb, cls, layer=NET[3])
    assert cam.shape == (b, h, w) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1


@pytest.mark.parametrize('name', list(BACKBONES))
def test_backbones(name):
    "Each registry backbone: the target layer holds its last convolution; maps have the input's shape, in [0, 1]."
    m = build_model(name, 5, pretrained=False).eval()
    assert [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1] in set(cam_layer(m).modules())
    cam = grad_cam(m, torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(0)))
    assert cam.shape == (2, 96, 80) and cam.min() >= 0 and cam.max() <= 1


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mass_concentrates_on_the_quadrant_the_model_uses(seed):
    "Trained (seeded, CPU, ~1 s) on images whose class is the colour of a top-left patch; Grad-CAM's mass sits top-left."
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    opt, (xb, yb) = torch.optim.Adam(net.parameters(), 3e-3), quadrant_images(256, seed=seed)
    for _ in range(60):
        i = torch.randint(0, 256, (32,))
        loss = F.cross_entropy(net(xb[i]), yb[i]); opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    xt, yt = quadrant_images(64, seed=100 + seed)
    assert (net(xt).argmax(1) == yt).float().mean() > 0.9
    cam = grad_cam(net, xt, yt.tolist(), layer=net[3])
    share = cam[:, :16, :16].sum((1, 2)) / cam.sum((1, 2))
    assert np.median(share) > 0.6 and share.min() > 0.4, (np.median(share), share.min())   # a uniform map: 0.25


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(2, 5), st.integers(0, 2**16))
def test_top_losses_are_sorted_cross_entropies(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    logits, targets = torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)
    idx, losses = top_losses(logits, targets)
    assert sorted(idx) == list(range(n)) and (losses[:-1] >= losses[1:]).all()
    assert torch.allclose(losses, F.cross_entropy(logits, targets, reduction='none')[idx])
    wrong, _ = top_losses(logits, targets, only_wrong=True)
    assert set(wrong) == {i for i in range(n) if logits[i].argmax() != targets[i]}


def test_training_logs_galleries_and_predict_explains(tmp_path):
    "A brief real training run: both galleries in the version folder and in the MLflow run; `--explain` writes one PNG per photo."
    if not MINI.is_dir(): pytest.skip(f"the food-101-mini sample is missing at {MINI}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = subprocess.run([str(BIN/'nutrilearn-train'), '--data-dir', str(MINI), '--no-pretrained', '--max-per-class', '2', '--num-workers', '0',
                        '--batch-size', '10', '--device', 'cpu', '--epochs', '1', '--checkpoint-dir', str(tmp_path/'ck'),
                        '--output-dir', str(tmp_path/'out'), '--tracking-uri', uri, '--experiment-name', 'explain',
                        '--registered-model-name', 'explain'], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert 'galleries skipped' not in r.stderr, r.stderr[-2000:]
    vdir = tmp_path/'out/v1'
    for name in ('misclassified.png', 'top_losses.png'):
        im = Image.open(vdir/name)
        assert im.format == 'PNG' and im.size[0] > 400 and (vdir/name).stat().st_size < 400_000
    import mlflow
    run_id = __import__('json').loads((vdir/'model_config.json').read_text())['mlflow_run_id']
    logged = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id)}
    assert {'misclassified.png', 'top_losses.png'} <= logged, logged
    photos = sorted((MINI/'food-101/images').rglob('*.jpg'))[:3]
    p = subprocess.run([str(BIN/'nutrilearn-predict'), *map(str, photos), '--model-dir', str(tmp_path/'out'), '--device', 'cpu',
                        '--explain', str(tmp_path/'why')], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 3, p.stdout + p.stderr
    assert sorted(x.name for x in (tmp_path/'why').iterdir()) == sorted(f'{q.stem}_gradcam.png' for q in photos)
    from nutrilearn_train.inference import Predictor
    cam = Predictor.from_dir(tmp_path/'out', 'cpu').explain(photos[0])
    assert cam.shape == (224, 224) and cam.min() >= 0 and cam.max() <= 1
