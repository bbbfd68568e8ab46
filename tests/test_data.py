"Property tests (hypothesis) and real-data tests for `nutrilearn_train.data`."
import io, shutil, struct, warnings, zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from PIL import Image
from torchvision.transforms import functional as TF

import nutrilearn_train.data as data
from nutrilearn_train.config import seed_worker
from nutrilearn_train.data import (IMAGENET_MEAN, IMAGENET_STD, BadImageError, build_train_transform, build_val_transform,
                                   check_image, get_data_loaders, get_test_loader, load_image, make_class_to_idx,
                                   make_loader, set_loader_epoch, stratified_split, cap_per_class, food101_samples)

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
PROPS = settings(max_examples=100, deadline=None, derandomize=True)
LO = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
HI = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
MODES = ('L', 'RGB', 'RGBA', 'P', 'CMYK', 'I;16', 'LA', '1')


def need_mini():
    if not (MINI/'food-101/meta/train.json').is_file(): pytest.skip(f"real data missing: {MINI}")
    return MINI


def _encode(im, fmt='JPEG', **kw):
    b = io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()


def _png_claiming(w, h):
    "A valid PNG header that claims `w`x`h` pixels (a decompression bomb costing 60 bytes)."
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00' * 16)) + chunk(b'IEND', b''))


@st.composite
def images(draw, max_side=64):
    "A random small image of any mode and size (1 px up), passed as a PIL image or as encoded TIFF/PNG bytes."
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    mode = draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == 'I;16': im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else: im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), 'RGBA').convert(mode)
    how = draw(st.sampled_from(['pil', 'tiff', 'png']))
    if how == 'png' and mode == 'CMYK': how = 'tiff'
    return (im if how == 'pil' else _encode(im, how.upper())), mode


def _in_bounds(x):
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert (x.amin((1, 2)) >= LO - 1e-5).all() and (x.amax((1, 2)) <= HI + 1e-5).all(), (x.amin((1, 2)), x.amax((1, 2)))


# Property 2: any input size/mode -> 3x224x224, values within [(0-mean)/std, (1-mean)/std] per channel.
@PROPS
@given(images())
def test_train_transform_any_image(case):
    src, mode = case
    torch.manual_seed(0)
    _in_bounds(build_train_transform()(load_image(src)))


@PROPS
@given(images())
def test_val_transform_any_image(case):
    src, mode = case
    im = load_image(src)
    assert im.mode == 'RGB'
    _in_bounds(build_val_transform()(im))


def test_bounds_are_reached():
    "The bounds are tight: pure black and pure white images hit them exactly."
    for colour, bound in (((0, 0, 0), LO), ((255, 255, 255), HI)):
        x = build_val_transform()(Image.new('RGB', (300, 260), colour))
        torch.testing.assert_close(x.amin((1, 2)), bound); torch.testing.assert_close(x.amax((1, 2)), bound)


# Property 6: inference preprocessing (build_val_transform) is deterministic and is exactly
# Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet).
@PROPS
@given(images(max_side=160))
def test_val_transform_is_the_documented_pipeline(case):
    im = load_image(case[0])
    tfm = build_val_transform()
    ref = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(im, 256), 224)), IMAGENET_MEAN, IMAGENET_STD)
    got = tfm(im)
    assert torch.equal(got, ref)
    assert torch.equal(build_val_transform()(im), got)  # a fresh builder, same tensor


# Property 11: class_to_idx is a bijection sorted names -> 0..n-1 with num_classes entries.
@PROPS
@given(st.lists(st.text(st.characters(codec='utf-8', exclude_characters='/\\\x00'), min_size=1, max_size=12),
                min_size=1, max_size=200))
def test_class_to_idx_bijection(names):
    c2i = make_class_to_idx(names + names[:3])  # duplicates do not add classes
    assert len(c2i) == len(set(names))
    assert sorted(c2i.values()) == list(range(len(c2i)))
    assert list(c2i) == sorted(set(names))


_TINY_PNG = _encode(Image.new('RGB', (2, 2), (9, 9, 9)), 'PNG')


@pytest.mark.filterwarnings('ignore:the validation part')  # one-image classes leave val empty, by design
@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sets(st.from_regex(r'[a-z][a-z0-9_]{0,10}', fullmatch=True), min_size=2, max_size=12),
       st.integers(0, 2**16))
def test_class_to_idx_of_a_folder_tree(tmp_path_factory, classes, seed):
    "Through get_data_loaders: one class per folder, sorted, and every label indexes `classes`."
    root = tmp_path_factory.mktemp('tree')
    for c in classes:
        (root/c).mkdir()
        for i in range(1 + seed % 3): (root/c/f'{i}.png').write_bytes(_TINY_PNG)
    tr, va, c2i = get_data_loaders(root, 4, 0, seed=seed, image_size=8, scan='none', pin_memory=False)
    assert c2i == {c: i for i, c in enumerate(sorted(classes))}
    assert tr.dataset.classes == va.dataset.classes == sorted(classes)
    assert {y for _, y in tr.dataset.samples} == set(range(len(classes)))  # every class trains


@PROPS
@given(st.lists(st.integers(0, 7), min_size=1, max_size=300), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_stratified_split_properties(labels, frac, seed):
    tr, va = stratified_split(labels, frac, seed)
    assert sorted(tr + va) == list(range(len(labels))) and not set(tr) & set(va)
    assert (tr, va) == stratified_split(labels, frac, seed)
    for c, n in Counter(labels).items():
        n_tr = sum(labels[i] == c for i in tr)
        assert n_tr >= 1 and (n < 2 or n - n_tr >= 1)
        assert abs(n_tr - n * frac) <= 1, (c, n, n_tr, frac)


@PROPS
@given(st.lists(st.integers(0, 5), min_size=1, max_size=200), st.integers(1, 40), st.integers(0, 2**31))
def test_cap_per_class(labels, cap, seed):
    keep = cap_per_class(labels, cap, seed)
    assert keep == sorted(set(keep)) == cap_per_class(labels, cap, seed)
    counts = Counter(labels[i] for i in keep)
    for c, n in Counter(labels).items(): assert counts[c] == min(n, cap)


# ---------------------------------------------------------------- real Food-101 photos (food-101-mini)

def test_food101_samples_match_torchvision():
    mini = need_mini()
    for split in ('train', 'test'):
        tv = torchvision.datasets.Food101(mini, split=split, download=False)
        ours = food101_samples(mini/'food-101', split)
        assert [p for p, _ in ours] == list(tv._image_files)
        assert [tv.class_to_idx[c] for _, c in ours] == tv._labels


def test_loaders_on_food101_mini():
    mini = need_mini()
    tr, va, c2i = get_data_loaders(mini, 16, 0, seed=42)
    classes = (mini/'food-101/meta/classes.txt').read_text().split()
    assert c2i == {c: i for i, c in enumerate(sorted(classes))} and len(c2i) == 10
    for dl, n in ((tr, 16), (va, 16)):
        xb, yb = next(iter(dl))
        assert xb.shape == (n, 3, 224, 224) and xb.dtype == torch.float32 and yb.dtype == torch.long
        assert 0 <= int(yb.min()) and int(yb.max()) < 10
    te = get_test_loader(mini, 16, 0, class_to_idx=c2i)
    assert len(te.dataset) == 150 and te.dataset.classes == tr.dataset.classes
    xb, yb = next(iter(te)); assert xb.shape == (16, 3, 224, 224) and int(yb.max()) < 10


def test_split_is_deterministic_disjoint_and_stratified():
    mini = need_mini()
    a = get_data_loaders(mini, 8, 0, seed=7, train_split=0.8)
    b = get_data_loaders(mini, 8, 0, seed=7, train_split=0.8)
    c = get_data_loaders(mini, 8, 0, seed=8, train_split=0.8)
    tr, va = a[0].dataset.samples, a[1].dataset.samples
    assert tr == b[0].dataset.samples and va == b[1].dataset.samples
    assert tr != c[0].dataset.samples
    assert not {p for p, _ in tr} & {p for p, _ in va}
    official = food101_samples(mini/'food-101', 'train')
    assert sorted(str(p) for p, _ in tr + va) == sorted(str(p) for p, _ in official)
    assert Counter(y for _, y in tr) == {y: 36 for y in range(10)}
    assert Counter(y for _, y in va) == {y: 9 for y in range(10)}
    test_paths = {p for p, _ in food101_samples(mini/'food-101', 'test')}
    assert not test_paths & {p for p, _ in tr + va}


def test_max_per_class_before_split():
    mini = need_mini()
    tr, va, _ = get_data_loaders(mini, 4, 0, max_per_class=10, seed=3)
    assert Counter(y for _, y in tr.dataset.samples) == {y: 8 for y in range(10)}
    assert Counter(y for _, y in va.dataset.samples) == {y: 2 for y in range(10)}
    assert tr.dataset.samples == get_data_loaders(mini, 4, 0, max_per_class=10, seed=3)[0].dataset.samples
    te = get_test_loader(mini, 4, 0, max_per_class=2)
    assert Counter(y for _, y in te.dataset.samples) == {y: 2 for y in range(10)}


def test_loader_settings_and_resumable_order():
    ds = list(range(23))
    dl = make_loader(ds, 4, shuffle=True, num_workers=2, seed=5, pin_memory=False)
    assert dl.persistent_workers and dl.worker_init_fn is seed_worker and dl.pin_memory is False
    assert make_loader(ds, 4).pin_memory == torch.cuda.is_available()
    flat = lambda loader: [x for b in loader for x in b.tolist()]
    epochs = []
    for e in range(3): set_loader_epoch(dl, e); epochs.append(flat(dl))  # one run, persistent workers
    assert epochs[0] != epochs[1] and all(len(o) == 20 and set(o) < set(ds) for o in epochs)  # 23 = 5 x 4 + a ragged 3, dropped
    resumed = make_loader(ds, 4, shuffle=True, num_workers=2, seed=5, pin_memory=False)
    set_loader_epoch(resumed, 2)
    assert flat(resumed) == epochs[2]  # a run resumed at epoch 2 sees epoch 2's order



def test_augmented_batches_are_resumable_and_worker_independent():
    "Exact resume with workers: epoch e's augmented batches depend only on (seed, e), not on workers or history."
    mini = need_mini()
    def epochs(num_workers, start, stop):
        tr = get_data_loaders(mini, 5, num_workers, max_per_class=2, seed=11, image_size=48)[0]
        out = []
        for e in range(start, stop):
            set_loader_epoch(tr, e)
            out.append([(xb.clone(), yb.clone()) for xb, yb in tr])
        return out
    straight = epochs(2, 0, 3)                    # one run, persistent workers
    resumed = epochs(2, 2, 3)[0]                  # a fresh process resuming at epoch 2
    single = epochs(0, 2, 3)[0]                   # the same epoch loaded in the main process
    flat = lambda ep: (torch.cat([x for x, _ in ep]), torch.cat([y for _, y in ep]))
    for other in (resumed, single):
        assert torch.equal(flat(straight[2])[0], flat(other)[0]) and torch.equal(flat(straight[2])[1], flat(other)[1])
    assert not torch.equal(flat(straight[1])[0], flat(straight[2])[0])

# ---------------------------------------------------------------- a folder of every kind of bad and odd file

@pytest.fixture
def messy_tree(tmp_path):
    "A flat ImageFolder tree of real photos plus one of each bad file and each odd mode."
    mini = need_mini()
    root = tmp_path/'messy'
    photos = sorted((mini/'food-101/images').glob('*/*.jpg'))
    for cls in ('curry', 'dosa'):
        (root/cls).mkdir(parents=True)
        for p in photos[:5] if cls == 'curry' else photos[5:10]: shutil.copy(p, root/cls/p.name)
    photo = Image.open(photos[0]).convert('RGB')
    w, h = photo.size
    real = photos[0].read_bytes()
    bad = {'curry/zero_bytes.jpg': b'', 'curry/truncated.jpg': real[:len(real) // 2],
           'dosa/readme.jpg': b'this is a text file, not a photo\n', 'dosa/bomb.png': _png_claiming(20_000, 20_000)}
    for rel, b in bad.items(): (root/rel).write_bytes(b)
    exif = Image.Exif(); exif[0x0112] = 6
    pal = photo.convert('P'); pal.info['transparency'] = 0
    odd = {'curry/grey.jpg': _encode(photo.convert('L')), 'curry/cmyk.jpg': _encode(photo.convert('CMYK')),
           'dosa/palette.png': _encode(photo.convert('P'), 'PNG'), 'dosa/rgba.png': _encode(photo.convert('RGBA'), 'PNG'),
           'dosa/palette_transparent.png': _encode(pal, 'PNG', transparency=0),
           'curry/sixteen_bit.png': _encode(Image.fromarray(np.asarray(photo.convert('L'), np.uint16) * 257), 'PNG'),
           'curry/exif_rotated.jpg': _encode(photo, exif=exif.tobytes())}
    for rel, b in odd.items(): (root/rel).write_bytes(b)
    return root, [root/r for r in bad], [root/r for r in odd], (w, h)


def _skipped(ws):
    return sorted(str(x.message).split(': ')[0].removeprefix('skipping bad image ') for x in ws
                  if str(x.message).startswith('skipping bad image'))


def test_bad_files_are_skipped_with_a_warning_naming_each(messy_tree):
    root, bad, odd, _ = messy_tree
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        tr, va, c2i = get_data_loaders(root, 4, 0, seed=0)
    assert _skipped(ws) == sorted(map(str, bad))
    kept = {p for p, _ in tr.dataset.samples + va.dataset.samples}
    assert not kept & set(bad) and set(odd) <= kept and len(kept) == 10 + len(odd)
    for dl in (tr, va):  # every kept image loads and batches
        for xb, yb in dl: assert xb.shape[1:] == (3, 224, 224) and len(xb) == len(yb) > 0


def test_bad_files_found_late_do_not_stop_an_epoch(messy_tree):
    root, bad, odd, _ = messy_tree
    tr, va, _ = get_data_loaders(root, 1, 0, seed=0, scan='none')  # nothing filtered up front; batches of one
    n_bad_in = sum(p in set(bad) for p, _ in tr.dataset.samples + va.dataset.samples)
    assert n_bad_in == len(bad)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        n = sum(len(yb) for dl in (tr, va) for _, yb in dl)
    assert n == 10 + len(odd)  # every good image, and the all-bad batches came out empty
    assert _skipped(ws) == sorted(map(str, bad))


def test_each_bad_file_raises_naming_it(messy_tree):
    root, bad, odd, (w, h) = messy_tree
    problems = {'zero_bytes.jpg': 'empty file (0 bytes)', 'truncated.jpg': 'truncated or corrupt image data',
                'readme.jpg': 'not a recognised image format', 'bomb.png': 'decompression bomb'}
    for p in bad:
        with pytest.raises(BadImageError) as e: load_image(p)
        assert str(p) in str(e.value) and problems[p.name] in str(e.value), str(e.value)
        assert problems[p.name] in check_image(p)


def test_odd_modes_become_rgb_and_exif_is_honoured(messy_tree):
    root, bad, odd, (w, h) = messy_tree
    for p in odd:
        im = load_image(p)
        assert im.mode == 'RGB', p
        assert im.size == ((h, w) if p.name == 'exif_rotated.jpg' else (w, h)), (p, im.size)
        assert check_image(p) is None
    # transparent palette entry -> white, not black
    im = load_image(root/'dosa/palette_transparent.png')
    src = Image.open(root/'dosa/palette_transparent.png')
    xy = next((x, y) for x in range(w) for y in range(h) if src.getpixel((x, y)) == 0)
    assert im.getpixel(xy) == (255, 255, 255)


def test_decompression_bomb_threshold_is_configurable(tmp_path):
    p = tmp_path/'big.png'; Image.new('RGB', (300, 200)).save(p)
    assert load_image(p).size == (300, 200)
    with pytest.raises(BadImageError, match='exceeds max_pixels=59999'): load_image(p, max_pixels=59_999)
    assert 'exceeds max_pixels=59999' in check_image(p, max_pixels=59_999)
    (tmp_path/'a').mkdir(); (tmp_path/'b').mkdir()
    shutil.copy(p, tmp_path/'a/x.png'); shutil.copy(p, tmp_path/'b/y.png')
    for f in ('a/w.png', 'b/v.png', 'b/z.png'): Image.new('RGB', (10, 10)).save(tmp_path/f)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        tr, va, _ = get_data_loaders(tmp_path, 2, 0, max_pixels=50_000, image_size=8)
    assert len(tr.dataset) + len(va.dataset) == 3
    assert _skipped(ws) == [str(tmp_path/'a/x.png'), str(tmp_path/'b/y.png')]


# ---------------------------------------------------------------- missing data: offline, nothing downloads

@pytest.fixture
def no_network(monkeypatch):
    "Fail loudly if anything tries to download; return the recorded fetch attempts."
    calls = []
    def offline(root):
        calls.append(root); raise OSError('[Errno 101] Network is unreachable')
    monkeypatch.setattr(data, '_fetch_food101', offline)
    def never(*a, **k): raise AssertionError('a real download was attempted')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', never)
    monkeypatch.setattr(torchvision.datasets.utils, 'download_and_extract_archive', never)
    return calls


def test_missing_data_without_download(tmp_path, no_network):
    with pytest.raises(FileNotFoundError) as e: get_data_loaders(tmp_path/'data', 8, 0)
    msg = str(e.value)
    assert str((tmp_path/'data').resolve()) in msg and 'food-101/meta/train.json' in msg and '<class>' in msg
    assert no_network == [] and not (tmp_path/'data').exists()
    with pytest.raises(FileNotFoundError, match='food-101/images'): get_test_loader(tmp_path/'data', 8, 0)


def test_offline_download_fails_with_layout_hint(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10**13, 0, 10**13))
    target = tmp_path/'not/yet/there'
    with pytest.raises(FileNotFoundError) as e: get_data_loaders(target, 8, 0, download=True)
    assert 'Downloading Food-101 failed (OSError' in str(e.value) and 'food-101/meta/train.json' in str(e.value)
    assert no_network == [target] and target.is_dir()  # missing folders were created


def test_download_refused_when_disk_is_short(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 3 * 10**9, 3 * 10**9))
    with pytest.raises(OSError) as e: get_data_loaders(tmp_path/'d', 8, 0, download=True)
    assert not isinstance(e.value, FileNotFoundError)
    assert 'Not enough free disk space' in str(e.value) and 'need ≈ 10.0 GB' in str(e.value) and 'only 3.0 GB free' in str(e.value)
    assert no_network == []


def test_download_not_attempted_when_data_present(tmp_path, no_network):
    mini = need_mini()
    tr, va, c2i = get_data_loaders(mini, 8, 0, download=True, max_per_class=2)
    assert len(c2i) == 10 and no_network == []
