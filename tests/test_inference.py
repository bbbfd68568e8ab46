"Property and integration tests for `nutrilearn_train.inference` (top-k decoding, preprocessing, Predictor, CLIs, exports)."
import io, json, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch import nn

from nutrilearn_train import inference as inf
from nutrilearn_train.data import build_val_transform, load_image
from nutrilearn_train.models import build_model
from nutrilearn_train.train import load_model_config, resolve_model_dir, save_model_artifacts

DATA = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent


def tiny_model(n_classes:int, seed:int=0) -> nn.Module:
    "A few-hundred-parameter classifier that pools adaptively (any input size)."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_classes)).eval()


def tiny_config(n_classes:int, size:int=32, resize:int=36) -> dict:
    return dict(model_name='tiny', num_classes=n_classes, class_names=[f'class_{i}' for i in range(n_classes)],
                input_size=size, resize_size=resize, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], version=1)


class Recorder(nn.Module):
    "Returns zero logits and remembers every batch it was given."
    def __init__(self, n_classes): super().__init__(); self.n, self.seen = n_classes, []
    def forward(self, xb): self.seen.append(xb.clone()); return torch.zeros(len(xb), self.n)


MODES = ('RGB', 'L', 'RGBA', 'P', 'CMYK', 'I;16')

@st.composite
def images(draw, max_side=80):
    "A random PIL image of random size and mode."
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    mode = draw(st.sampled_from(MODES))
    return im if mode == 'RGB' else im.convert(mode) if mode != 'I;16' else im.convert('L').convert('I;16')


@pytest.fixture(scope='module')
def scratch(tmp_path_factory): return tmp_path_factory.mktemp('images')


def as_source(im:Image.Image, kind:str, tmp:Path):
    "`im` as a PIL image, TIFF bytes or a TIFF file (lossless for every mode in `MODES`)."
    if kind == 'pil': return im
    buf = io.BytesIO(); im.save(buf, 'TIFF')
    if kind == 'bytes': return buf.getvalue()
    p = tmp/'img.tiff'; p.write_bytes(buf.getvalue()); return p


# ---- property 7: top-k decoding -------------------------------------------------------------------------------

def check_topk(preds, probs, class_names, k):
    assert len(preds) == k
    ps = [p for _, p in preds]
    assert all(0.0 <= p <= 1.0 for p in ps), ps
    assert all(a >= b for a, b in zip(ps, ps[1:])), ps
    assert abs(float(probs.sum()) - 1.0) <= 1e-5
    top = sorted(probs.tolist(), reverse=True)[:k]
    np.testing.assert_allclose(ps, top, rtol=0, atol=1e-12)
    for name, p in preds: assert abs(float(probs[class_names.index(name)]) - p) <= 1e-12
    assert len({n for n, _ in preds}) == k


@settings(max_examples=200, deadline=None)
@given(n=st.integers(3, 120), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 10.0, 100.0, 1e4]),
       ties=st.booleans())
def test_topk_decoding_property_7(n, seed, scale, ties):
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, scale, n), dtype=torch.float32)
    if ties: logits = logits.round()  # many equal logits
    names = [f'c{i}' for i in range(n)]
    preds = inf.topk_predictions(logits, names, top_k=3)
    check_topk(preds, inf.class_probabilities(logits), names, 3)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 10), k=st.integers(-2, 14))
def test_topk_out_of_range_raises(n, k):
    names = [f'c{i}' for i in range(n)]
    if 1 <= k <= n: assert len(inf.topk_predictions(torch.zeros(n), names, top_k=k)) == k
    else:
        with pytest.raises(ValueError, match=f'top_k must be an integer in 1..{n}'): inf.topk_predictions(torch.zeros(n), names, top_k=k)


@settings(max_examples=100, deadline=None)
@given(im=images(), n=st.integers(3, 12), kind=st.sampled_from(['pil', 'bytes', 'path']), seed=st.integers(0, 1000))
def test_predict_image_property_7(scratch, im, n, kind, seed):
    model, cfg = tiny_model(n, seed), tiny_config(n)
    preds = inf.predict_image(model, as_source(im, kind, scratch), cfg, 'cpu', top_k=3)
    with torch.inference_mode(): logits = model(inf.preprocess_image(im, cfg)[None])[0]
    check_topk(preds, inf.class_probabilities(logits), cfg['class_names'], 3)


def test_predict_image_rejects_too_large_top_k(tmp_path):
    with pytest.raises(ValueError, match='top_k must be an integer in 1..3'):
        inf.predict_image(tiny_model(3), Image.new('RGB', (8, 8)), tiny_config(3), top_k=4)


# ---- property 6: inference preprocessing == validation preprocessing ---------------------------------------

@settings(max_examples=100, deadline=None)
@given(im=images(), size=st.integers(8, 64), extra=st.integers(0, 40), kind=st.sampled_from(['pil', 'bytes', 'path']))
def test_inference_preprocessing_is_validation_preprocessing_property_6(scratch, im, size, extra, kind):
    cfg = tiny_config(4, size=size, resize=size + extra)
    expected = build_val_transform(size=size, resize=size + extra)(load_image(im))
    src = as_source(im, kind, scratch)
    assert torch.equal(inf.preprocess_image(src, cfg), expected)
    # what the model actually receives, through predict_image and through Predictor
    rec = Recorder(4).eval()
    inf.predict_image(rec, src, cfg)
    pred = inf.Predictor(rec, cfg)
    pred.predict(src); pred.predict_batch([src, src])
    assert len(rec.seen) == 3
    for xb in rec.seen:
        for x in xb: assert torch.equal(x, expected)


# ---- Predictor: batch == single, thread safety ---------------------------------------------------------------

def test_predictor_threads_match_serial():
    torch.manual_seed(0)
    model = build_model('mobilenet_v2', 5, pretrained=False).eval()
    pred = inf.Predictor(model, tiny_config(5, size=48, resize=56))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)) for i in range(12)]
    serial = [pred.predict(im) for im in imgs]
    with ThreadPoolExecutor(8) as ex:
        threaded = list(ex.map(pred.predict, imgs * 4))
        batched = list(ex.map(lambda i: pred.predict_batch(imgs[i:i+4]), range(0, 12, 4)))
    assert threaded == serial * 4
    for got, want in zip([p for b in batched for p in b], serial):
        assert [c for c, _ in got] == [c for c, _ in want]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5)


def test_bad_images_are_named(tmp_path):
    pred = inf.Predictor(tiny_model(3), tiny_config(3))
    (bad := tmp_path/'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
    (empty := tmp_path/'empty.jpg').write_bytes(b'')
    for p, what in ((bad, 'broken.jpg'), (empty, 'empty file')):
        with pytest.raises(ValueError, match=what): pred.predict(p)
    with pytest.raises(FileNotFoundError, match='missing.jpg'): pred.predict(tmp_path/'missing.jpg')


# ---- integration: train briefly, reload, registry, exports, CLIs ----------------------------------------------

def run_cli(*args, timeout=600):
    return subprocess.run([str(BIN/args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=timeout,
                          # passive OpenMP waiting: on shared 2-core machines spinning threads slow torch down 10-100x
                          env={'OMP_WAIT_POLICY': 'PASSIVE', **os.environ, 'PYTHONWARNINGS': 'ignore'})


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A mobilenet_v2 trained for one epoch on 3 photos per class with --tta, registered as food-test@champion."
    if not DATA.is_dir(): pytest.skip(f'test data folder {DATA} is missing')
    d = tmp_path_factory.mktemp('trained')
    uri = f"sqlite:///{(d/'mlflow.db').resolve()}"
    r = run_cli('nutrilearn-train', '--data-dir', DATA, '--model-name', 'mobilenet_v2', '--no-pretrained', '--max-per-class', 3,
                '--epochs', 1, '--batch-size', 8, '--num-workers', 0, '--device', 'cpu', '--output-dir', d/'outputs',
                '--checkpoint-dir', d/'checkpoints', '--tracking-uri', uri, '--experiment-name', 'inference-test',
                '--registered-model-name', 'food-test', '--model-alias', 'champion', '--promote', 'always', '--tta')
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((DATA/'food-101/meta/test.json').read_text())
    test = [DATA/'food-101/images'/f'{rel}.jpg' for c in sorted(meta) for rel in meta[c]]
    return dict(dir=d, outputs=d/'outputs', uri=uri, test_images=test)


def top1(preds): return [p[0][0] for p in preds]


def test_training_calibrates_and_records_tta(trained):
    "--tta: the folder records it, the temperature and threshold fitted on the validation split, and the test split's calibration."
    mdir = resolve_model_dir(trained['outputs'])
    mc = load_model_config(mdir)
    assert mc['tta'] is True and mc['temperature'] > 0 and 0 <= mc['uncertainty_threshold'] <= 1, mc
    cal = json.loads((mdir/'calibration.json').read_text())
    assert (mdir/'reliability_diagram.png').is_file() and cal['metrics']['ece_after'] == mc['test_ece_after']
    assert {'test_ece_before', 'test_ece_after', 'test_nll_before', 'test_nll_after', 'test_uncertain_share'} <= set(mc)
    assert all(0 <= mc[k] <= 1 for k in ('test_ece_before', 'test_ece_after', 'test_uncertain_share'))
    from mlflow import MlflowClient
    run = MlflowClient(trained['uri']).get_run(mc['mlflow_run_id'])
    assert {'temperature', 'uncertainty_threshold', 'val_nll_before', 'test_ece_after'} <= set(run.data.metrics)
    assert run.data.params['tta'] == 'True'


def test_reload_registry_exports_agree(trained):
    model_dir = resolve_model_dir(trained['outputs'])
    mc = load_model_config(model_dir)
    model, cfg = inf.load_model_for_inference(trained['outputs'], device='cpu')
    assert cfg == mc and not model.training and len(cfg['class_names']) == 10
    imgs = trained['test_images']
    assert len(imgs) == 150
    from_dir = inf.Predictor.from_dir(trained['outputs'], device='cpu')
    ref = [p for i in range(0, len(imgs), 32) for p in from_dir.predict_batch(imgs[i:i+32])]
    assert all(len(p) == 3 for p in ref)
    assert top1(ref)[:5] == [inf.predict_image(model, im, cfg, 'cpu')[0][0] for im in imgs[:5]]

    reg = inf.Predictor.from_registry('models:/food-test@champion', tracking_uri=trained['uri'], device='cpu')
    assert reg.class_names == from_dir.class_names and reg.version == 1
    assert inf.Predictor.from_registry(('food-test', 1), tracking_uri=trained['uri'], device='cpu').version == 1
    results = {'registry': reg}
    for fmt in ('torchscript', 'onnx'):
        r = run_cli('nutrilearn-export', '--model-dir', trained['outputs'], '--format', fmt)
        assert r.returncode == 0, r.stderr[-3000:]
        path = inf.default_export_path(model_dir, mc, fmt)
        assert path.is_file() and str(path) in r.stdout
        d = float(r.stdout.split('max |Δ logits| vs PyTorch = ')[1].split()[0])
        dp = float(r.stdout.split('max |Δ calibrated probability| ')[1].split(')')[0])
        assert d <= 1e-4 and dp <= 1e-4, r.stdout
        results[fmt] = inf.Predictor.from_export(path)
        assert results[fmt].class_names == from_dir.class_names and results[fmt].config['mean'] == mc['mean']
    want = [a for i in range(0, len(imgs), 32) for a in from_dir.answer_batch(imgs[i:i+32])]
    assert from_dir.tta is True and [a['predictions'] for a in want] == ref
    for name, p in results.items():
        assert {k: p.config.get(k) for k in ('temperature', 'uncertainty_threshold', 'tta')} == \
               {k: mc[k] for k in ('temperature', 'uncertainty_threshold', 'tta')}, name      # exports carry the calibration
        got = [q for i in range(0, len(imgs), 32) for q in p.answer_batch(imgs[i:i+32])]
        assert top1([a['predictions'] for a in got]) == top1(ref), name
        flips = [a['uncertain'] != b['uncertain'] for a, b in zip(got, want)]
        near = [abs(b['predictions'][0][1] - mc['uncertainty_threshold']) < 1e-4 for b in want]
        assert all(n for f, n in zip(flips, near) if f), name                                 # same flags, but for a hair's breadth


def test_int8_export(trained):
    out = trained['dir']/'model.int8.onnx'
    r = run_cli('nutrilearn-export', '--model-dir', trained['outputs'], '--format', 'int8', '--output', out,
                '--calibration-dir', DATA, '--calibration-images', 20)
    assert r.returncode == 0, r.stderr[-3000:]
    run, meta = inf.load_exported(out)
    assert meta['format'] == 'int8' and len(meta['class_names']) == 10 and 'quantization' in meta
    share = float(r.stdout.split('int8: ')[1].split('%')[0])
    assert share < 40, r.stdout  # int8 weights: about a quarter of the fp32 ONNX file
    q = inf.Predictor.from_export(out)
    preds = q.predict_batch(trained['test_images'][:8])
    assert all(len(p) == 3 for p in preds)


def test_predict_cli_json_and_bad_image(trained, tmp_path):
    imgs = trained['test_images'][:2]
    (bad := tmp_path/'bad.jpg').write_bytes(b'not a jpeg at all')
    r = run_cli('nutrilearn-predict', *imgs, bad, '--model-dir', trained['outputs'], '--json', '--top-k', 3, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [e['image'] for e in out] == [*map(str, imgs), str(bad)]
    pred = inf.Predictor.from_dir(trained['outputs'], device='cpu')
    for e, im in zip(out[:2], imgs):
        assert [set(p) for p in e['predictions']] == [{'class', 'probability'}] * 3
        assert e['uncertain'] is pred.answer(im)['uncertain']
        want = pred.predict(im)
        assert [p['class'] for p in e['predictions']] == [c for c, _ in want]
        np.testing.assert_allclose([p['probability'] for p in e['predictions']], [p for _, p in want], atol=1e-5)
    assert set(out[2]) == {'image', 'error'} and 'bad.jpg' in out[2]['error']
    assert 'Traceback' not in r.stderr

    r = run_cli('nutrilearn-predict', imgs[0], bad, '--model-dir', trained['outputs'])
    assert r.returncode == 0 and r.stdout.startswith(f'{imgs[0]}: ') and r.stdout.count('\n') == 1
    assert 'bad.jpg' in r.stderr and 'Traceback' not in r.stderr

    r = run_cli('nutrilearn-predict', bad, tmp_path/'missing.jpg', '--model-dir', trained['outputs'], '--json')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert [set(e) for e in json.loads(r.stdout)] == [{'image', 'error'}] * 2

    r = run_cli('nutrilearn-predict', imgs[0], '--model-dir', trained['outputs'], '--threshold', '1', '--no-tta', '--json')
    e, = json.loads(r.stdout)
    assert r.returncode == 0 and e['uncertain'] is True, r.stderr
    assert np.isclose(e['predictions'][0]['probability'], pred.predict(imgs[0], tta=False)[0][1], atol=1e-5)

    r = run_cli('nutrilearn-predict', imgs[0], '--model-dir', tmp_path/'nowhere')
    assert r.returncode == 2 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
