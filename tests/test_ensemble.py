"""Issue 14, ensembles: the averaging arithmetic (hypothesis properties), `Predictor.ensemble` over folders, exported files
and registry references, and `nutrilearn-evaluate --model-dir A --model-dir B` on food-101-mini as a real process."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch import nn

from nutrilearn_train.ensemble import ensemble_logits, ensemble_weights
from nutrilearn_train.inference import Predictor, export_torchscript

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}
CFG = dict(model_name='tiny', num_classes=3, class_names=['a', 'b', 'c'], input_size=32, resize_size=36,
           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], version=1)


def members_logits(draw_shape):
    n_members, n, c = draw_shape
    return st.lists(st.lists(st.lists(st.floats(-30, 30), min_size=c, max_size=c), min_size=n, max_size=n),
                    min_size=n_members, max_size=n_members).map(lambda x: [torch.tensor(m) for m in x])


shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6))
logit_sets = shapes.flatmap(members_logits)


@settings(max_examples=150, deadline=None)
@given(logit_sets, st.data())
def test_probabilities_sum_to_one_and_lie_between_members(logits, data):
    "The ensemble's probabilities sum to 1 and each lies between the members' smallest and largest."
    w = data.draw(st.lists(st.floats(0, 10), min_size=len(logits), max_size=len(logits)).filter(lambda w: sum(w) > 1e-3))
    p = ensemble_logits(logits, w).softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(len(p), dtype=p.dtype), atol=1e-9)
    mp = torch.stack([l.double().softmax(-1) for l in logits])
    assert (p >= mp.min(0).values - 1e-9).all() and (p <= mp.max(0).values + 1e-9).all()


@settings(max_examples=150, deadline=None)
@given(logit_sets)
def test_one_member_and_weights_one_zero(logits):
    "An ensemble of one is its member; weights (1, 0, …) are the first member."
    first = logits[0].double().softmax(-1)
    assert torch.allclose(ensemble_logits(logits[:1]).softmax(-1), first, atol=1e-9)
    assert torch.allclose(ensemble_logits(logits, [1] + [0] * (len(logits) - 1)).softmax(-1), first, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=6))
def test_weights_normalised_or_refused(w):
    if sum(w) > 0:
        got = ensemble_weights(w, len(w))
        assert abs(sum(got) - 1) < 1e-9 and all(g >= 0 for g in got)
    else:
        with pytest.raises(ValueError, match='positive sum'): ensemble_weights(w, len(w))


def tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def photos(n=5):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (40, 44, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


def probs(pred, ims): return [dict(p) for p in pred.predict_batch(ims)]


def close(a, b, eps=1e-6): return all(abs(x[k] - y[k]) < eps for x, y in zip(a, b) for k in x)


def test_predictor_ensemble_of_predictors_and_exports(tmp_path):
    "Members given as Predictors and as an exported TorchScript file; ensemble of one, weights (1, 0), the weighted mean."
    m1, m2, ims = tiny(1), tiny(2), photos()
    p1, p2 = Predictor(m1, CFG), Predictor(m2, CFG)
    ts = export_torchscript(m2, CFG, tmp_path/'m2.torchscript.pt').path
    assert close(probs(Predictor.ensemble([p1]), ims), probs(p1, ims))
    assert close(probs(Predictor.ensemble([p1, ts], weights=[1, 0]), ims), probs(p1, ims))
    ens, a, b = probs(Predictor.ensemble([p1, ts], weights=[1, 3]), ims), probs(p1, ims), probs(p2, ims)
    assert close(ens, [{k: (x[k] + 3 * y[k]) / 4 for k in x} for x, y in zip(a, b)], 1e-5)
    assert all(abs(sum(e.values()) - 1) < 1e-6 for e in ens)


@pytest.fixture(scope='module')
def two_models(tmp_path_factory):
    "Two briefly trained mobilenet_v2 models (different seeds) registered in one sqlite registry."
    if not MINI.is_dir(): pytest.skip(f"the food-101-mini sample is missing at {MINI}")
    d = tmp_path_factory.mktemp('ens')
    uri = f"sqlite:///{d}/mlflow.db"
    for s in (1, 2):
        r = subprocess.run([str(BIN/'nutrilearn-train'), '--data-dir', str(MINI), '--no-pretrained', '--max-per-class', '2',
                            '--num-workers', '0', '--batch-size', '10', '--device', 'cpu', '--epochs', '1', '--seed', str(s),
                            '--checkpoint-dir', str(d/f'ck{s}'), '--output-dir', str(d/f'out{s}'), '--tracking-uri', uri,
                            '--experiment-name', 'ens', '--registered-model-name', f'ens{s}'],
                           cwd=d, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return d, uri


def test_evaluate_ensemble_and_members_in_one_table(two_models):
    "One `nutrilearn-evaluate` call prints both members and the ensemble; the saved numbers agree with each member evaluated alone."
    d, _ = two_models
    r = subprocess.run([str(BIN/'nutrilearn-evaluate'), '--model-dir', str(d/'out1'), '--model-dir', str(d/'out2'), '--data-dir', str(MINI),
                        '--max-per-class', '3', '--num-workers', '0', '--device', 'cpu'], cwd=d, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[1].split()[:2] == ['model', 'images'] and lines[4].startswith('ensemble'), r.stdout
    saved = json.loads((d/'out1/v1/ensemble_evaluation/comparison.json').read_text())
    assert len(saved) == 3 and {v['total_samples'] for v in saved.values()} == {30}
    one = subprocess.run([str(BIN/'nutrilearn-evaluate'), '--model-dir', str(d/'out2'), '--data-dir', str(MINI), '--max-per-class', '3',
                          '--num-workers', '0', '--device', 'cpu', '--no-mlflow', '--output-dir', str(d/'alone')],
                         cwd=d, env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    alone = json.loads((d/'alone/evaluation.json').read_text())
    member2 = next(v for k, v in saved.items() if k.startswith('2: '))
    assert member2['top1_accuracy'] == alone['top1_accuracy'] and member2['macro_f1'] == alone['macro_f1']


def test_ensemble_of_registry_reference_and_folder(two_models):
    "A `models:/…` member and a folder member: weights (1, 0) give exactly the registry model's answer."
    d, uri = two_models
    ims = sorted((MINI/'food-101/images').rglob('*.jpg'))[:4]
    reg = Predictor.from_registry('models:/ens1@challenger', uri, 'cpu')
    ens = Predictor.ensemble(['models:/ens1@challenger', d/'out2'], weights=[1, 0], device='cpu', tracking_uri=uri)
    assert close(probs(ens, ims), probs(reg, ims))
    assert ens.model_name == 'ensemble(mobilenet_v2, mobilenet_v2)' and len(ens.members) == 2
