"Property tests (hypothesis) and CLI integration tests for `nutrilearn_train.evaluate`."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.metrics import top_k_accuracy_score, precision_recall_fscore_support

from nutrilearn_train.evaluate import (confusion_matrix, normalize_rows, topk_accuracy, most_confused,
                                       most_confident_errors, results_from_logits, per_class_metrics, EvaluationResults)

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
PROPS = settings(max_examples=100, deadline=None, derandomize=True)


@st.composite
def labelled(draw, max_n=60, max_classes=15):
    "N classes and matching y_true / y_pred label lists (possibly empty, classes possibly absent)."
    n_classes = draw(st.integers(1, max_classes))
    n = draw(st.integers(0, max_n))
    lab = st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)
    return n_classes, np.array(draw(lab), dtype=np.int64), np.array(draw(lab), dtype=np.int64)


# Property 12: N x N matrix; row sums = samples per true class.
@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn's hint for N == 1, where the shape is right
@PROPS
@given(labelled())
def test_confusion_matrix_shape_and_row_sums(case):
    n_classes, y_true, y_pred = case
    cm = confusion_matrix(y_true, y_pred, n_classes)
    assert cm.shape == (n_classes, n_classes)
    assert (cm >= 0).all() and cm.dtype == np.int64
    np.testing.assert_array_equal(cm.sum(1), np.bincount(y_true, minlength=n_classes))
    np.testing.assert_array_equal(cm.sum(0), np.bincount(y_pred, minlength=n_classes))
    assert np.trace(cm) == int((y_true == y_pred).sum())
    for t, p in zip(y_true[:5], y_pred[:5]): assert cm[t, p] >= 1
    rows = normalize_rows(cm)
    np.testing.assert_allclose(rows.sum(1), (cm.sum(1) > 0).astype(float), atol=1e-12)


@PROPS
@given(labelled(max_n=40, max_classes=8), st.integers(1, 5))
def test_confusion_matrix_rejects_out_of_range_labels(case, extra):
    n_classes, y_true, y_pred = case
    bad = np.append(y_true, n_classes - 1 + extra)  # scikit-learn would silently drop it
    with pytest.raises(ValueError, match=f"y_true must lie in 0..{n_classes-1}"):
        confusion_matrix(bad, np.append(y_pred, 0), n_classes)


@st.composite
def scored(draw):
    "Tie-free (N, C) scores and N targets: each row is a random permutation of distinct values."
    n_classes, n = draw(st.integers(2, 12)), draw(st.integers(1, 50))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scores = np.stack([rng.permutation(n_classes) for _ in range(n)]).astype(np.float32) + rng.normal(0, .1, (n, 1)).astype(np.float32)
    return torch.from_numpy(scores), torch.from_numpy(rng.integers(0, n_classes, n))


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")  # sklearn: k >= C is a perfect score
@PROPS
@given(scored(), st.lists(st.integers(1, 14), min_size=1, max_size=4))
def test_topk_accuracy_matches_brute_force_and_sklearn(case, ks):
    logits, targets = case
    n, c = logits.shape
    got = topk_accuracy(logits, targets, ks)
    # brute force: the target is in the top k iff fewer than k classes score strictly higher (no ties by construction)
    rank = (logits > logits[torch.arange(n), targets][:, None]).sum(1)
    for k, acc in zip(ks, got):
        assert acc == (rank < k).sum().item() / n
        if c > 2:  # scikit-learn wants 1-D scores for binary problems
            assert acc == pytest.approx(top_k_accuracy_score(targets.numpy(), logits.numpy(), k=k, labels=range(c)), abs=1e-9)
    if sorted(ks) == ks: assert got == sorted(got)  # top-k accuracy never falls as k grows


@PROPS
@given(st.integers(1, 9), st.integers(0, 2**32 - 1), st.integers(1, 4), st.one_of(st.none(), st.integers(1, 30)))
def test_most_confused_ordering(n_classes, seed, min_count, k):
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 6, (n_classes, n_classes))
    names = [f"c{i}" for i in range(n_classes)]
    pairs = most_confused(cm, names, k=k, min_count=min_count)
    idx = {c: i for i, c in enumerate(names)}
    expected = sorted(((-cm[i, j], i, j) for i in range(n_classes) for j in range(n_classes)
                       if i != j and cm[i, j] >= min_count))[:k]
    assert [(idx[t], idx[p]) for t, p, _ in pairs] == [(i, j) for _, i, j in expected]
    counts = [c for _, _, c in pairs]
    assert counts == sorted(counts, reverse=True) and all(t != p for t, p, _ in pairs)
    assert all(cm[idx[t], idx[p]] == c for t, p, c in pairs)


@PROPS
@given(scored())
def test_most_confident_errors_are_wrong_and_sorted(case):
    logits, targets = case
    probs = torch.softmax(logits, 1)
    errs = most_confident_errors(probs, targets)
    conf, preds = probs.max(1)
    assert sorted(errs) == (preds != targets).nonzero().flatten().tolist()
    assert [conf[i].item() for i in errs] == sorted((conf[i].item() for i in errs), reverse=True)


@PROPS
@given(scored())
def test_results_agree_with_sklearn_and_round_trip(case):
    logits, targets = case
    names = [f"class_{i}" for i in range(logits.shape[1])]
    r = results_from_logits(logits, targets, names, inference_time_ms=2.0)
    p, rc, f, _ = precision_recall_fscore_support(targets, logits.argmax(1), labels=range(len(names)), zero_division=0)
    np.testing.assert_allclose([r.per_class_f1[c] for c in names], f)
    np.testing.assert_allclose([r.per_class_recall[c] for c in names], rc)
    assert r.per_class_precision == per_class_metrics(targets, logits.argmax(1), names)['precision']
    assert r.total_samples == len(targets) and r.confusion_matrix.sum() == len(targets)
    assert [f for _, f in r.worst_classes] == sorted(f for _, f in r.worst_classes)
    assert len(r.worst_classes) == min(5, len(names))
    d = json.loads(json.dumps(r.to_dict()))
    assert np.array_equal(np.array(d['confusion_matrix']), r.confusion_matrix) and d['top1_accuracy'] == r.top1_accuracy


# ---- integration: the console script on real Food-101 images ----

def _cli(*args, cwd):
    "Run the installed `nutrilearn-evaluate` console script (or `python -m` where it is not on disk)."
    exe = Path(sys.executable).with_name('nutrilearn-evaluate')
    cmd = [str(exe)] if exe.is_file() else [sys.executable, '-m', 'nutrilearn_train.evaluate']
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONWARNINGS': 'ignore'})


@pytest.fixture(scope='module')
def mini():
    if not MINI.is_dir(): pytest.skip(f"real-image data not found at {MINI}")
    return MINI


def _save_tiny_model(out, classes, tracking_uri, extra=None, **cfg):
    "Save an untrained mobilenet_v2 (no download) in the ARTIFACT FORMAT under `out`."
    from nutrilearn_train.models import build_model
    from nutrilearn_train.train import save_model_artifacts
    from nutrilearn_train.config import TrainingConfig, config_to_dict
    torch.manual_seed(0)
    cfg = config_to_dict(TrainingConfig(num_classes=len(classes), pretrained=False, tracking_uri=tracking_uri, **cfg))
    return save_model_artifacts(build_model('mobilenet_v2', len(classes), pretrained=False),
                                {c: i for i, c in enumerate(classes)}, cfg, output_dir=out, extra=extra)


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory, mini):
    "Output folder holding one saved tiny model (no MLflow run), and its classes."
    classes = (mini/'food-101/meta/classes.txt').read_text().split()
    out = tmp_path_factory.mktemp('outputs')
    _save_tiny_model(out, classes, f"sqlite:///{out}/none.db")
    return out, classes


def test_cli_evaluates_saved_artifacts(artifacts, mini, tmp_path):
    out_dir, classes = artifacts
    res = _cli('--model-dir', out_dir, '--data-dir', mini, '--max-per-class', 3, '--output-dir', tmp_path/'eval',
               '--num-workers', 0, '--device', 'cpu', cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'top-1' in res.stdout and 'worst:' in res.stdout, res.stdout
    ev = json.loads((tmp_path/'eval/evaluation.json').read_text())
    assert ev['total_samples'] == 3 * len(classes) and 0 <= ev['top1_accuracy'] <= ev['top5_accuracy'] <= 1
    assert np.array(ev['confusion_matrix']).sum(1).tolist() == [3] * len(classes)
    from PIL import Image
    with Image.open(tmp_path/'eval/confusion_matrix.png') as im:
        im.verify(); assert im.format == 'PNG' and im.size[0] >= 600
    header = (tmp_path/'eval/classification_report.csv').read_text().splitlines()[0]
    assert header == 'class,precision,recall,f1,support'
    assert (tmp_path/'eval/most_confused.csv').read_text().startswith('true_class,predicted_class,count')


@pytest.mark.parametrize('problem, message', [('missing', 'does not exist'), ('bad_json', 'is not valid JSON')])
def test_cli_bad_input_fails_cleanly(problem, message, mini, tmp_path):
    model_dir = tmp_path/'nope' if problem == 'missing' else tmp_path/'v1'
    if problem == 'bad_json': model_dir.mkdir(); (model_dir/'model_config.json').write_text('{not json')
    res = _cli('--model-dir', model_dir, '--data-dir', mini, '--device', 'cpu', cwd=tmp_path)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith('nutrilearn-evaluate: error: ') and message in res.stderr, res.stderr
    assert 'Traceback' not in res.stderr


def test_cli_logs_to_the_models_mlflow_run(mini, tmp_path):
    mlflow = pytest.importorskip('mlflow')
    from nutrilearn_train.tracking import MLflowTracker
    classes = (mini/'food-101/meta/classes.txt').read_text().split()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = MLflowTracker(uri, 'eval-test', tmp_path/'train_journal.jsonl')
    run_id = t.start(run_name='train'); t.end()
    vdir = _save_tiny_model(tmp_path/'outputs', classes, uri, extra={'mlflow_run_id': run_id}, experiment_name='eval-test')
    ended = mlflow.MlflowClient(uri).get_run(run_id).info.end_time
    res = _cli('--model-dir', vdir, '--data-dir', mini, '--max-per-class', 2, '--num-workers', 0, '--device', 'cpu',
               '--tracking-uri', uri, cwd=tmp_path)   # the store is named by the user, never taken from the folder
    assert res.returncode == 0, res.stderr
    assert f"logged test_* metrics and 6 files to run {run_id}" in res.stdout, res.stdout   # + calibration.json, reliability_diagram.png
    ev = json.loads((vdir/'evaluations/test_1/evaluation.json').read_text())  # default output dir: a new folder in the version folder
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.metrics['test_top1'] == pytest.approx(ev['top1_accuracy'])
    assert run.data.metrics['test_samples'] == 2 * len(classes)
    assert (run.info.status, run.info.end_time) == ('FINISHED', ended)   # added to, not reopened and ended again
    arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, 'evaluation_test')}
    assert {'evaluation_test/evaluation.json', 'evaluation_test/confusion_matrix.png', 'evaluation_test/reliability_diagram.png'} <= arts, arts
    cal = json.loads((vdir/'evaluations/test_1/calibration.json').read_text())['metrics']
    assert run.data.metrics['test_ece_after'] == pytest.approx(cal['ece_after'])   # the calibration metrics go to the run too
