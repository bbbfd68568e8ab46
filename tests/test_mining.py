"""Issue 14, uncertain-image mining: each strategy agrees with its definition (hypothesis), the ranking is right on a model
whose uncertainty is known by construction, and `nutrilearn-mine` runs as a real process over food-101-mini photos."""
import csv, math, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from nutrilearn_train.mining import STRATEGIES, rank_uncertain, score_images, uncertainty
from nutrilearn_train.inference import Predictor
from nutrilearn_train.models import build_model
from nutrilearn_train.train import save_model_artifacts

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}

prob_rows = st.integers(2, 8).flatmap(lambda c: st.lists(st.lists(st.floats(0, 1), min_size=c, max_size=c).filter(lambda r: sum(r) > 1e-3),
                                                         min_size=1, max_size=6))


def normalised(rows): return np.array([[x / sum(r) for x in r] for r in rows], dtype=np.float64)


@settings(max_examples=200, deadline=None)
@given(prob_rows)
def test_strategies_match_their_definitions(rows):
    "entropy = -Σ p log p, margin = 1 - (p1 - p2), least-confidence = 1 - p1, computed independently in plain Python."
    p = normalised(rows)
    ref = {'entropy': [-sum(x * math.log(x) for x in r if x > 0) for r in p],
           'margin': [1 - (sorted(r)[-1] - sorted(r)[-2]) for r in p],
           'least-confidence': [1 - max(r) for r in p]}
    for s in STRATEGIES:
        got = uncertainty(torch.tensor(p), s).tolist()
        assert np.allclose(got, ref[s], atol=1e-9), (s, got, ref[s])


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 10), st.integers(0, 9))
def test_one_hot_is_certain_and_uniform_is_most_uncertain(c, k):
    "0 for a one-hot vector; the uniform vector scores at least as high as any other row."
    onehot, uniform = torch.zeros(1, c, dtype=torch.float64), torch.full((1, c), 1 / c, dtype=torch.float64)
    onehot[0, k % c] = 1
    other = torch.rand(1, c, dtype=torch.float64, generator=torch.Generator().manual_seed(k)); other /= other.sum()
    for s in STRATEGIES:
        assert uncertainty(onehot, s).item() == pytest.approx(0, abs=1e-12)
        assert uncertainty(uniform, s).item() >= uncertainty(other, s).item() - 1e-12


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 5, allow_nan=False), max_size=30))
def test_ranking_is_a_descending_permutation(scores):
    order = rank_uncertain(torch.tensor(scores, dtype=torch.float64))
    assert sorted(order) == list(range(len(scores)))
    assert all(scores[a] > scores[b] or (scores[a] == scores[b] and a < b) for a, b in zip(order, order[1:]))


class Hue(torch.nn.Module):
    "Three logits from the image's red, green and blue means: a grey image is a three-way tie, a pure colour is certain."
    def forward(self, xb):
        m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3); s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3)
        return 10 * (xb.mean((2, 3)) * s + m)


def test_ranking_known_by_construction(tmp_path):
    "Mixing a pure colour with grey in known proportions: the greyer the photo, the more uncertain, for every strategy."
    cfg = dict(model_name='hue', num_classes=3, class_names=['red', 'green', 'blue'], input_size=16, resize_size=18,
               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], version=1)
    mix = {0.9: (240, 40, 40), 0.1: (130, 120, 120), 0.5: (40, 180, 40), 0.3: (90, 90, 150), 0.0: (128, 128, 128)}
    for k, (w, rgb) in enumerate(mix.items()): Image.new('RGB', (20, 20), rgb).save(tmp_path/f'{k}.png')
    paths = sorted(tmp_path.glob('*.png'))
    expected = ['4.png', '1.png', '3.png', '2.png', '0.png']   # grey, nearly grey, … , nearly pure red
    for s in STRATEGIES:
        rows, skipped = score_images(Predictor(Hue(), cfg), paths, s, batch_size=2)
        assert [Path(r['image']).name for r in rows] == expected and skipped == [], s


@pytest.fixture(scope='module')
def model_and_folder(tmp_path_factory):
    if not MINI.is_dir(): pytest.skip(f"the food-101-mini sample is missing at {MINI}")
    d = tmp_path_factory.mktemp('mine')
    classes = (MINI/'food-101/meta/classes.txt').read_text().split()
    torch.manual_seed(0)
    save_model_artifacts(build_model('mobilenet_v2', len(classes), pretrained=False).eval(), {c: i for i, c in enumerate(classes)},
                         {'model_name': 'mobilenet_v2', 'image_size': 64}, output_dir=d/'out')
    folder = d/'unlabelled'; (folder/'deeper').mkdir(parents=True)
    for i, p in enumerate(sorted((MINI/'food-101/images').rglob('*.jpg'))[::40]):
        (folder/('deeper' if i % 2 else '.')/f'{i:02d}_{p.name}').write_bytes(p.read_bytes())
    (folder/'broken.jpg').write_bytes(p.read_bytes()[:200])          # truncated JPEG
    (folder/'empty.png').write_bytes(b'')
    return d, folder


def test_mine_cli(model_and_folder, tmp_path):
    "Real process: CSV sorted by uncertainty with top-3, contact sheet, copies, unreadable files skipped and named."
    d, folder = model_and_folder
    n_good = len([p for p in folder.rglob('*.jpg') if p.name != 'broken.jpg'])
    r = subprocess.run([str(BIN/'nutrilearn-mine'), '--model-dir', str(d/'out'), '--images', str(folder), '--top', '4', '--strategy', 'margin',
                        '--copy-to', str(tmp_path/'to_label'), '--output-dir', str(tmp_path/'m'), '--batch-size', '5', '--device', 'cpu'],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'scored {n_good} images' in r.stdout and 'skipped 2;' in r.stdout, r.stdout
    assert 'broken.jpg' in r.stderr and 'empty.png' in r.stderr and 'scoring' in r.stderr, r.stderr[-2000:]   # named, and the progress bar
    rows = list(csv.DictReader(open(tmp_path/'m/uncertain.csv')))
    assert len(rows) == n_good and [float(x['uncertainty']) for x in rows] == sorted((float(x['uncertainty']) for x in rows), reverse=True)
    assert all(x['strategy'] == 'margin' and x['class3'] and float(x['prob1']) >= float(x['prob2']) >= float(x['prob3']) for x in rows)
    assert Image.open(tmp_path/'m/uncertain.png').format == 'PNG'
    copied = sorted(p.name for p in (tmp_path/'to_label').iterdir())
    assert copied == [f'{k + 1:04d}_{Path(x["image"]).name}' for k, x in enumerate(rows[:4])]


def test_mine_help_and_bad_input(tmp_path):
    r = subprocess.run([str(BIN/'nutrilearn-mine'), '--help'], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '--strategy {entropy,margin,least-confidence}' in r.stdout and '(default: entropy)' in r.stdout, r.stdout
    assert '(default: True)' not in r.stdout and '(default: False)' not in r.stdout
    r = subprocess.run([str(BIN/'nutrilearn-mine'), '--model-dir', str(tmp_path), '--images', str(tmp_path/'none')],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'pass --images FOLDER' in r.stderr, r.stderr
    r = subprocess.run([str(BIN/'nutrilearn-mine'), '--model-dir', str(tmp_path), '--images', str(tmp_path), '--strategy', 'random'],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'random'" in r.stderr, r.stderr
