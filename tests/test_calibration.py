"""Issue 20, items 3 (TTA), 4 and 5: confidence that means what it says, and "not sure" instead of a wrong answer.

Hypothesis properties of the pure functions against their definitions (02b_predict, 02d_metrics), then the served
pyfunc loaded by MLflow's own models-from-code loader and answered by its scoring function (what `mlflow models serve`
runs per request): it returns `uncertain`, takes a per-request `threshold`, and answers a folder saved before
calibration exactly as before."""
import base64, importlib.util, io, json, math, warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from PIL import Image

from nutrilearn_train.metrics import (auroc, calibration_report, expected_calibration_error, fit_temperature, reliability_table,
                                      uncertainty_threshold)
from nutrilearn_train.predict import answer_settings, class_probabilities, flip_logits, is_uncertain

CLASSES = ['apple_pie', 'pizza', 'ramen']


@st.composite
def logits_and_targets(draw, min_n=1, max_n=60, max_c=12):
    "Random (N, C) logits at a random scale and N targets, from a drawn seed (fast to generate, wide to cover)."
    n, c = draw(st.integers(min_n, max_n)), draw(st.integers(2, max_c))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 4.0, 20.0]))
    return z, torch.randint(0, c, (n,), generator=g)


# ---------------------------------------------------------------- temperature scaling

@settings(max_examples=200, deadline=None)
@given(zt=logits_and_targets(), t=st.floats(0.02, 50.0))
def test_temperature_scaling_never_changes_the_ranking(zt, t):
    "softmax(z / T) orders the classes as z does: the predicted class (and every pair) is unchanged, and rows sum to 1."
    z, _ = zt
    p = class_probabilities(z, t)
    assert torch.allclose(p.sum(1), torch.ones(len(z), dtype=torch.float64), atol=1e-12)
    assert torch.equal(p.gather(1, z.argmax(1, keepdim=True))[:, 0], p.max(1).values)   # the logits' argmax is still the top
    bigger = z[:, :, None] > z[:, None, :]                                                 # z_i > z_j  =>  p_i >= p_j
    assert (p[:, :, None] >= p[:, None, :])[bigger].all()


@settings(max_examples=150, deadline=None)
@given(zt=logits_and_targets(min_n=2, max_n=200))
def test_the_fitted_temperature_never_increases_the_nll_on_its_fitting_set(zt):
    "NLL(T_fit) <= NLL(1): T = 1 is a candidate; and T_fit is a minimum within the bounds (nudging it does not help)."
    z, y = zt
    assume((z - z.mean(1, keepdim=True)).abs().max() > 0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # a temperature at its bound warns (separable or hopeless logits): allowed here
        t = fit_temperature(z, y)
    nll = lambda temp: F.cross_entropy(z / temp, y).item()
    assert 0.01 <= t <= 100
    assert nll(t) <= nll(1.0) + 1e-9, (t, nll(t), nll(1.0))
    for nudge in (0.98, 1.02):
        if 0.01 <= t * nudge <= 100: assert nll(t) <= nll(t * nudge) + 1e-9, (t, nudge)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), true_t=st.floats(0.3, 4.0))
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels(seed, true_t):
    "Labels drawn from softmax(z / T) for known T: the fitted T is within 15 % of it (4000 samples)."
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4000, 8, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial((z / true_t).softmax(1), 1, generator=g)[:, 0]
    assert abs(fit_temperature(z, y) / true_t - 1) < 0.15


# ---------------------------------------------------------------- ECE

@settings(max_examples=200, deadline=None)
@given(zt=logits_and_targets(max_n=120), n_bins=st.integers(1, 30))
def test_ece_lies_in_0_1_and_bins_account_for_every_sample(zt, n_bins):
    z, y = zt
    p = class_probabilities(z)
    e = expected_calibration_error(p, y, n_bins)
    t = reliability_table(p, y, n_bins)
    assert 0.0 <= e <= 1.0
    assert t['count'].sum() == len(y) and len(t['count']) == n_bins
    ok = t['count'] > 0
    conf = p.max(1).values.numpy()
    assert np.all(t['confidence'][ok] > t['edges'][:-1][ok] - 1e-12) and np.all(t['confidence'][ok] <= t['edges'][1:][ok] + 1e-12)
    # the definition: the count-weighted mean |accuracy - confidence| over the non-empty bins
    acc = (p.argmax(1) == y).double().numpy()
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    want = sum((b == k).sum() / len(y) * abs(acc[b == k].mean() - conf[b == k].mean()) for k in range(n_bins) if (b == k).any())
    assert math.isclose(e, want, abs_tol=1e-9) or _on_a_bin_edge(conf, n_bins)


def _on_a_bin_edge(conf, n_bins) -> bool:
    "A confidence within rounding of k/n may fall on either side depending on how the edge is computed."
    return bool(np.any(np.abs(conf * n_bins - np.round(conf * n_bins)) < 1e-9))


# ---------------------------------------------------------------- the uncertainty threshold and the flag

@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), keep=st.floats(0.01, 1.0), ties=st.booleans())
def test_threshold_keeps_at_least_keep_of_the_correct_answers_and_is_the_largest_that_does(seed, n, keep, ties):
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 6, n) / 5 if ties else rng.uniform(0, 1, n)
    c = rng.uniform(0, 1, n) < p   # more confident answers are more often right
    assume(c.any())
    t = uncertainty_threshold(p, c, keep)
    assert (p[c] >= t).mean() >= keep - 1e-12
    assert (p[c] >= np.nextafter(t, 2)).mean() < keep or t == p[c].max()   # any larger threshold keeps fewer


@settings(max_examples=200, deadline=None)
@given(zt=logits_and_targets(), t=st.one_of(st.none(), st.floats(0.0, 1.0), st.integers(0, 59)))
def test_uncertain_is_set_exactly_below_the_threshold(zt, t):
    "Strictly below: an answer exactly at the threshold (an int draws one of the rows' own top probabilities) is answered."
    p = class_probabilities(zt[0])
    if isinstance(t, int): t = float(p.max(1).values[t % len(p)])
    flags = is_uncertain(p, t)
    assert flags.tolist() == ([False] * len(p) if t is None else [float(m) < t for m in p.max(1).values])


# ---------------------------------------------------------------- TTA and AUROC

@settings(max_examples=200, deadline=None)
@given(a=logits_and_targets(), seed=st.integers(0, 2**31 - 1))
def test_tta_is_the_mean_of_the_two_softmaxes(a, seed):
    z = a[0].float()
    zf = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)) * 5
    tta = flip_logits(z, zf)
    assert torch.allclose(class_probabilities(tta), (z.double().softmax(1) + zf.double().softmax(1)) / 2, atol=1e-6)
    assert torch.allclose(tta.double().exp().sum(1), torch.ones(len(z), dtype=torch.float64), atol=1e-5)   # log of that mean, not shifted


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_pos=st.integers(1, 50), n_neg=st.integers(1, 50), levels=st.sampled_from([3, 10, 1000]))
def test_auroc_is_scikit_learns(seed, n_pos, n_neg, levels):
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(seed)
    pos, neg = rng.integers(0, levels, n_pos) / levels + 0.1, rng.integers(0, levels, n_neg) / levels   # ties when levels is small
    want = roc_auc_score(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg])
    assert math.isclose(auroc(pos, neg), want, abs_tol=1e-12)


def test_calibration_report_before_is_at_t1_and_after_at_the_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 5, generator=g) * 5
    y = torch.multinomial((z / 2).softmax(1), 1, generator=g)[:, 0]
    m = calibration_report(z, y, 2.0, threshold=0.5)['metrics']
    assert math.isclose(m['ece_before'], expected_calibration_error(class_probabilities(z), y))
    assert math.isclose(m['ece_after'], expected_calibration_error(class_probabilities(z, 2.0), y))
    assert m['ece_after'] < m['ece_before']


# ---------------------------------------------------------------- the served model (MLflow's loader and scoring function)

def _jpeg(seed:int) -> bytes:
    b = io.BytesIO(); Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(b, 'JPEG')
    return b.getvalue()


def _served(tmp_path, **calibration):
    "The serving pyfunc saved as tracking logs it (models from code), for a 32-px model folder with `calibration` keys; and the folder."
    import mlflow.pyfunc
    from nutrilearn_train.config import TrainingConfig, config_to_dict
    from nutrilearn_train.models import build_model
    from nutrilearn_train.persistence import save_model_artifacts
    from nutrilearn_train.serving import pyfunc_artifacts, serving_signature
    torch.manual_seed(0)
    cfg = {**config_to_dict(TrainingConfig(num_classes=3, pretrained=False, tracking_uri='sqlite:////nonexistent/mlflow.db')), 'image_size': 32}
    vdir = save_model_artifacts(build_model('mobilenet_v2', 3, pretrained=False), {c: i for i, c in enumerate(CLASSES)}, cfg,
                                output_dir=tmp_path/'out', extra=calibration or None)
    code = importlib.util.find_spec('nutrilearn_train.serving').origin
    mlflow.pyfunc.save_model(str(tmp_path/'model'), python_model=code, artifacts=pyfunc_artifacts(vdir), signature=serving_signature(),
                             pip_requirements=[])
    return mlflow.pyfunc.load_model(str(tmp_path/'model')), vdir


def _invoke(model, rows, **params):
    "One POST /invocations body through MLflow's scoring function: the parsed predictions (or the MlflowException)."
    from mlflow.pyfunc import scoring_server
    body = {'dataframe_split': {'columns': ['image'], 'data': [[r] for r in rows]}, **({'params': params} if params else {})}
    r = scoring_server.invocations(json.dumps(body), 'application/json', model, model.metadata.get_input_schema())
    assert r.status == 200, r.response
    return json.loads(r.response)['predictions']


def test_served_model_returns_uncertain_as_the_predictor_answers(tmp_path):
    "A calibrated version: `uncertain` per image, the same answers as Predictor.from_dir; a request's threshold overrides; a bad one is a 400."
    from mlflow.exceptions import MlflowException
    from nutrilearn_train.inference import Predictor
    model, vdir = _served(tmp_path, temperature=0.3, uncertainty_threshold=0.9, tta=True)
    photos = [_jpeg(i) for i in range(6)]
    rows = [base64.b64encode(p).decode() for p in photos]
    got = _invoke(model, rows + [None])
    want = Predictor.from_dir(vdir, device='cpu').answer_batch(photos)
    assert [g['uncertain'] for g in got] == [a['uncertain'] for a in want] + [None]    # a failed row: no flag, its error
    assert got[-1]['error'] and all(g['error'] is None for g in got[:-1])
    for g, a in zip(got, want):
        assert g['classes'] == [c for c, _ in a['predictions']]
        assert np.allclose(g['probabilities'], [p for _, p in a['predictions']], atol=1e-5)
        assert g['uncertain'] == (g['probabilities'][0] < 0.9)
    assert [g['uncertain'] for g in _invoke(model, rows, threshold=0.0)] == [False] * 6
    assert [g['uncertain'] for g in _invoke(model, rows, threshold=1.0)] == [True] * 6
    with pytest.raises(MlflowException) as e: _invoke(model, rows[:1], threshold=1.5)
    assert e.value.error_code == 'INVALID_PARAMETER_VALUE' and 'uncertainty threshold must be a probability in [0, 1]' in e.value.message


def test_served_model_of_a_folder_saved_before_calibration_answers_as_before(tmp_path):
    "No temperature, threshold or tta in model_config.json: the plain softmax of one view, never uncertain."
    model, vdir = _served(tmp_path)
    mc = json.loads((vdir/'model_config.json').read_text())
    assert not set(mc) & {'temperature', 'uncertainty_threshold', 'tta'}
    assert answer_settings(mc) == dict(temperature=1.0, threshold=None, tta=False)
    from nutrilearn_train.data import build_val_transform, load_image
    from nutrilearn_train.persistence import load_saved_model
    net = load_saved_model(vdir/mc['weights_file'], mc)
    photos = [_jpeg(i) for i in range(3)]
    got = _invoke(model, [base64.b64encode(p).decode() for p in photos], top_k=1)
    for g, p in zip(got, photos):
        with torch.no_grad(): probs = net(build_val_transform(32, 37)(load_image(p))[None]).softmax(1)[0]
        assert g['uncertain'] is False and g['classes'] == [CLASSES[int(probs.argmax())]]
        assert abs(g['probabilities'][0] - float(probs.max())) < 1e-5
