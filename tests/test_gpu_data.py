"Property tests (hypothesis) and real-data tests for `nutrilearn_train.gpu_data`, run on CPU tensors (same code path as CUDA)."
import io, math, warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from unittest import mock
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms.functional import pil_to_tensor

import cuda_checks
from nutrilearn_train.config import TrainingConfig, make_generator
from nutrilearn_train.data import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, BadImageError, build_train_transform,
                                   build_val_transform, get_data_loaders, load_image, set_loader_epoch)
from nutrilearn_train import gpu_data
from nutrilearn_train.gpu_data import (ByteBatch, DevicePrefetcher, GPUBatchPipeline, collate_bytes, color_jitter_batch,
                                       crop_resize, crop_resize_groups, decode_items, device_decodable, flip_batch,
                                       get_gpu_data_loaders, jpeg_header, normalize_batch, pad_images, probe_gpu_pipeline,
                                       read_image_bytes, resize_center_crop, sample_crop_boxes, sample_train_params)

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
PROPS = settings(max_examples=100, deadline=None, derandomize=True)
LO = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
HI = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def need_mini():
    if not (MINI/'food-101/meta/train.json').is_file(): pytest.skip(f"real data missing: {MINI}")
    return MINI


def _encode(im, fmt='JPEG', **kw):
    b = io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()


def _rand_image(seed, h, w, mode='RGB'):
    rng = np.random.default_rng(seed)
    # smooth-ish content (JPEG-friendly) plus noise, so crops differ visibly
    base = np.linspace(0, 255, w)[None, :, None] * rng.random((1, 1, 3)) + np.linspace(0, 255, h)[:, None, None] * rng.random((1, 1, 3))
    arr = np.clip(base / 2 + rng.integers(0, 64, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def _as_item(data: bytes):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# ---------------------------------------------------------------- JPEG header parsing

@PROPS
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(['RGB', 'L', 'CMYK']), st.booleans(),
       st.integers(0, 8), st.integers(20, 95), st.booleans(), st.sampled_from([0, 1, 3]))
def test_jpeg_header_matches_pil(h, w, mode, progressive, orientation, quality, keep_rgb, restart):
    "The marker walk reads the size, channel count, progressive flag, EXIF orientation and RGB storage PIL reads."
    kw = dict(progressive=progressive, quality=quality, keep_rgb=keep_rgb, restart_marker_blocks=restart)
    if orientation:
        ex = Image.Exif(); ex[0x0112] = orientation; kw['exif'] = ex.tobytes()
    data = _encode(_rand_image(h * w, h, w, mode), **kw)
    hd, im = jpeg_header(data), Image.open(io.BytesIO(data))
    assert (hd['height'], hd['width']) == (im.height, im.width)
    assert hd['channels'] == len(im.getbands())
    assert hd['sof'] == (2 if progressive else 0)
    assert hd['orientation'] == (im.getexif().get(0x0112) or 1)
    assert hd['rgb'] == (keep_rgb and mode == 'RGB')   # libjpeg skips the YCbCr conversion for these; nvjpeg would not
    assert device_decodable(data) == (mode != 'CMYK' and not 2 <= orientation <= 8 and not hd['rgb'])


@PROPS
@given(st.binary(max_size=600), st.integers(0, 5000))
def test_jpeg_header_never_crashes_on_garbage(junk, cut):
    "Random bytes, and JPEGs cut anywhere, give None or a header — never an exception."
    good = _encode(_rand_image(1, 30, 40))
    for data in (junk, b'\xff\xd8\xff' + junk, good[:cut % len(good)]):
        jpeg_header(data)
        assert not device_decodable(data) or data[:3] == b'\xff\xd8\xff'
    assert not device_decodable(good[:cut % (len(good) - 1)])  # a cut file lacks the end-of-image marker


# ---------------------------------------------------------------- RandomResizedCrop parameters

def _consistent(box, H, W):
    "True if a rounded (h, w) box could come from an unrounded area in `SCALE`·H·W and an aspect in `RATIO`."
    t, l, h, w = box
    a_lo, a_hi = (max(w - .5, 0)) * max(h - .5, 0), (w + .5) * (h + .5)
    r_lo, r_hi = max(w - .5, 0) / (h + .5), (w + .5) / max(h - .5, 1e-9)
    return a_lo <= SCALE[1] * H * W and a_hi >= SCALE[0] * H * W and r_lo <= RATIO[1] and r_hi >= RATIO[0]


@PROPS
@given(st.lists(st.tuples(st.integers(1, 700), st.integers(1, 700)), min_size=1, max_size=16), st.integers(0, 2**31))
def test_crop_boxes_inside_and_in_range(sizes, seed):
    "Every box lies inside its image; non-fallback boxes have area fraction in [0.08, 1] and aspect in [3/4, 4/3] (up to rounding)."
    boxes, fallback = sample_crop_boxes(torch.tensor(sizes), generator=make_generator(seed))
    for (t, l, h, w), (H, W), fb in zip(boxes.tolist(), sizes, fallback.tolist()):
        assert 0 <= t and t + h <= H and 0 <= l and l + w <= W and h >= 1 and w >= 1
        if not fb: assert _consistent((t, l, h, w), H, W), ((t, l, h, w), H, W)
        if not fb and min(H, W) >= 100:  # big images: rounding is negligible, check the ranges directly
            assert 0.08 - 0.02 <= h * w / (H * W) <= 1 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


@PROPS
@given(st.integers(1, 700), st.integers(1, 700), st.booleans())
def test_fallback_is_torchvision_centre_crop(H, W, too_wide):
    "With scale (1, 1) and an aspect range no rounded full-area crop can meet, every attempt misses: the crop is torchvision's fallback."
    # area H*W fits only if aspect <= (W+.5)^2/(HW) and >= HW/(H+.5)^2; choose a range strictly outside that
    r = ((W + 1) ** 2 / (H * W), 1.2 * (W + 1) ** 2 / (H * W)) if too_wide else (H * W / (H + 1) ** 2 / 1.2, H * W / (H + 1) ** 2)
    boxes, fallback = sample_crop_boxes(torch.tensor([[H, W]] * 8), scale=(1.0, 1.0), ratio=r, generator=make_generator(H * W))
    assert fallback.all()
    expect = tuple(T.RandomResizedCrop.get_params(torch.zeros(1, H, W), [1.0, 1.0], list(r)))
    for b in boxes.tolist(): assert tuple(b) == expect, (b, expect)


@pytest.mark.parametrize('H,W', [(512, 512), (512, 384), (60, 600), (20, 24)])
def test_crop_distribution_matches_torchvision(H, W):
    "Two-sample KS tests: our batched crops and torchvision's per-image `get_params` have the same h, w, top and left distributions."
    n = 3000
    ours, _ = sample_crop_boxes(torch.tensor([[H, W]] * n), generator=make_generator(123))
    torch.manual_seed(321)
    img = torch.zeros(1, H, W)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)])
    for k, name in enumerate(('top', 'left', 'height', 'width')):
        p = stats.ks_2samp(ours[:, k].numpy(), theirs[:, k].numpy()).pvalue
        assert p > 1e-4, (name, p)


def test_flip_rate_is_one_half():
    "2000 flips with a fixed seed: the count is within 4 sigma of 1000 (binomial, p = 0.5)."
    n = 2000
    flips = sample_train_params(torch.tensor([[64, 64]] * n), generator=make_generator(7))['flip']
    assert abs(int(flips.sum()) - n / 2) <= 4 * math.sqrt(n * 0.25), int(flips.sum())


def test_flip_is_applied_per_sample():
    "With jitter off, the pipeline output of a flipped sample is the mirror of the same crop unflipped."
    img = _encode(_rand_image(3, 48, 64))
    pipe = GPUBatchPipeline(True, 'cpu', image_size=24, jitter=(0, 0, 0), generator=make_generator(5))
    xb, _ = pipe([_as_item(img)] * 64, [0] * 64)
    p = pipe.last_params
    ims, _ = decode_items([_as_item(img)], ['x'])
    base = crop_resize(pad_images(ims * 64), p['boxes'], 24)
    for i in range(64):
        expect = base[i].flip(-1) if p['flip'][i] else base[i]
        assert torch.allclose(xb[i], ((expect / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)), atol=1e-4)
    assert 0 < int(p['flip'].sum()) < 64


# ---------------------------------------------------------------- crop, jitter, validation resize

@PROPS
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 48), st.integers(0, 2**31))
def test_crop_resize_whole_image_equals_bilinear_upscale(h, w, size, seed):
    "A whole-image box resized up is `F.interpolate(bilinear)` — the padding never leaks into edge pixels."
    size = max(size, h, w)
    other = torch.randint(0, 256, (3, 41, 41), generator=make_generator(seed + 1), dtype=torch.uint8)
    im = torch.randint(0, 256, (3, h, w), generator=make_generator(seed), dtype=torch.uint8)
    out = crop_resize(pad_images([im, other]), torch.tensor([[0, 0, h, w], [0, 0, 41, 41]]), size)[0]
    ref = F.interpolate(im[None].float(), (size, size), mode='bilinear', align_corners=False)[0]
    assert torch.allclose(out, ref, atol=2e-3), (out - ref).abs().max()


@PROPS
@given(st.integers(1, 6), st.integers(0, 2**31))
def test_color_jitter_matches_torchvision_per_sample(B, seed):
    "Per-sample factors and order give exactly torchvision's adjust_brightness/contrast/saturation chain on each sample."
    g = make_generator(seed)
    x = torch.rand(B, 3, 9, 7, generator=g)
    fac = 0.8 + 0.4 * torch.rand(B, 3, generator=g)
    order = torch.rand(B, 3, generator=g).argsort(1)
    out = color_jitter_batch(x, fac, order, bound=1.)
    adj = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for b in range(B):
        ref = x[b]
        for i in order[b].tolist(): ref = adj[i](ref, float(fac[b, i]))
        assert torch.allclose(out[b], ref, atol=1e-5), (out[b] - ref).abs().max()


@PROPS
@given(st.lists(st.tuples(st.integers(8, 90), st.integers(8, 90)), min_size=1, max_size=5), st.integers(8, 32), st.integers(0, 2**31))
def test_val_resize_matches_pil_within_one_level(sizes, size, seed):
    "Validation resize + centre crop equals PIL's `Resize` + `CenterCrop` within one grey level."
    resize = size + size // 7
    ims = [pil_to_tensor(_rand_image(seed + i, h, w)) for i, (h, w) in enumerate(sizes)]
    out = resize_center_crop(ims, size, resize)
    for im, o in zip(ims, out):
        ref = pil_to_tensor(TF.center_crop(TF.resize(TF.to_pil_image(im), resize), size)).float()
        assert (o - ref).abs().max() <= 1, (o - ref).abs().max()


# ---------------------------------------------------------------- the whole pipeline

@st.composite
def batches(draw):
    "1-6 small images of random size, each as JPEG bytes (any kind) or a pre-decoded uint8 tensor."
    items = []
    for i in range(draw(st.integers(1, 6))):
        h, w = draw(st.integers(1, 70)), draw(st.integers(1, 70))
        im = _rand_image(draw(st.integers(0, 2**31)), h, w, draw(st.sampled_from(['RGB', 'L'])))
        how = draw(st.sampled_from(['baseline', 'progressive', 'tensor']))
        items.append(pil_to_tensor(im.convert('RGB')) if how == 'tensor' else _as_item(_encode(im, progressive=how == 'progressive')))
    return items


@PROPS
@given(batches(), st.booleans(), st.integers(8, 40), st.booleans(), st.integers(0, 2**31))
def test_pipeline_shapes_and_bounds(items, train, size, channels_last, seed):
    "Any batch gives [B, 3, size, size] float32 inside the exact normalised bounds; labels follow the images."
    pipe = GPUBatchPipeline(train, 'cpu', image_size=size, resize=size + 4, generator=make_generator(seed), channels_last=channels_last)
    labels = torch.arange(len(items))
    xb, yb = pipe(items, labels)
    assert xb.shape == (len(items), 3, size, size) and xb.dtype == torch.float32 and torch.isfinite(xb).all()
    assert (xb >= LO - 1e-5).all() and (xb <= HI + 1e-5).all()
    assert torch.equal(yb, labels)
    assert xb.is_contiguous(memory_format=torch.channels_last) == channels_last or size == 1


@PROPS
@given(st.integers(0, 2**31), st.integers(2, 12))
def test_identical_images_get_different_crops(seed, B):
    "Per-sample randomness: B copies of one image get B crops that are not all the same, and outputs differ."
    img = _as_item(_encode(_rand_image(9, 120, 160)))
    pipe = GPUBatchPipeline(True, 'cpu', image_size=16, generator=make_generator(seed))
    xb, _ = pipe([img] * B, [0] * B)
    boxes = pipe.last_params['boxes']
    assert len({tuple(b) for b in boxes.tolist()}) > 1
    assert (xb - xb[:1]).abs().amax((1, 2, 3)).max() > 0.05


def test_same_seed_same_batch_and_device_independent_params():
    "Parameters come from the CPU generator only: same seed, same batch."
    items = [_as_item(_encode(_rand_image(i, 50 + i, 60))) for i in range(4)]
    a = GPUBatchPipeline(True, 'cpu', 32, generator=make_generator(1))(items, [0] * 4)[0]
    b = GPUBatchPipeline(True, 'cpu', 32, generator=make_generator(1))(items, [0] * 4)[0]
    c = GPUBatchPipeline(True, 'cpu', 32, generator=make_generator(2))(items, [0] * 4)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- bad and non-JPEG files

def _bad_tree(root: Path):
    rgb = _rand_image(0, 40, 50)
    ex = Image.Exif(); ex[0x0112] = 6
    files = {'ok.jpg': _encode(rgb), 'png.jpg': _encode(rgb, 'PNG'), 'cmyk.jpg': _encode(rgb.convert('CMYK')),
             'rot.jpg': _encode(rgb, exif=ex.tobytes()), 'grey.jpg': _encode(rgb.convert('L')),
             'empty.jpg': b'', 'text.jpg': b'not a photo', 'trunc.jpg': _encode(rgb)[:300]}
    for cls in ('a', 'b'):
        (root / cls).mkdir(parents=True)
        for name, data in files.items(): (root / cls / name).write_bytes(data)
    return files


def test_read_image_bytes_routes_and_equals_cpu_path(tmp_path):
    "JPEGs the device can decode travel as bytes; PNG, CMYK and EXIF-rotated files are decoded on the CPU exactly as `load_image` does."
    _bad_tree(tmp_path)
    for name, encoded in [('ok.jpg', True), ('grey.jpg', True), ('png.jpg', False), ('cmyk.jpg', False), ('rot.jpg', False)]:
        p = tmp_path / 'a' / name
        x = read_image_bytes(p)
        assert (x.dim() == 1) == encoded, name
        ims, kept = decode_items([x], [str(p)])
        assert kept == [0] and torch.equal(ims[0], pil_to_tensor(load_image(p))), name


def test_bad_files_are_skipped_with_a_warning_naming_them(tmp_path):
    "Through the loaders (scan='none': every bad file reaches a worker) each bad file is skipped once per pass with its name."
    _bad_tree(tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); warnings.filterwarnings('ignore', category=DeprecationWarning)
        tr, va, c2i, tp, vp = get_gpu_data_loaders(tmp_path, 4, 0, device='cpu', train_split=0.5, seed=0, image_size=32, scan='none')
        n = sum(len(tp(b)[1]) for b in tr) + sum(len(vp(b)[1]) for b in va)
    assert n == 10  # 5 usable files x 2 classes
    msgs = [str(m.message) for m in w if 'skipping' in str(m.message)]
    for cls in ('a', 'b'):
        for bad in ('empty.jpg', 'text.jpg', 'trunc.jpg'):
            assert sum(f'{cls}/{bad}' in m for m in msgs) == 1, (cls, bad, msgs)


@PROPS
@given(st.integers(10, 600), st.integers(0, 2**31))
def test_corrupt_scan_data_is_decoded_or_skipped(cut, seed):
    "A JPEG with an intact header but damaged scan data never breaks the batch: it decodes (libjpeg recovers) or is skipped with a warning."
    good = _encode(_rand_image(seed, 40, 50))
    rng = np.random.default_rng(seed)
    broken = bytearray(good); pos = min(len(good) - 3, cut + 200)
    broken[pos:pos + 20] = rng.integers(0, 256, len(broken[pos:pos + 20]), dtype=np.uint8).tobytes()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); warnings.filterwarnings('ignore', category=DeprecationWarning)
        xb, yb = GPUBatchPipeline(False, 'cpu', 16, 20)([_as_item(good), _as_item(bytes(broken)), _as_item(good)], [0, 1, 2], ['g', 'broken.jpg', 'g'])
    assert yb.tolist() in ([0, 1, 2], [0, 2]) and len(xb) == len(yb)
    if len(yb) == 2: assert any('skipping bad image broken.jpg' in str(m.message) for m in w)


def test_collate_round_trip_through_workers(tmp_path):
    "Packed batches survive 2 worker processes; items come back byte-exact."
    _bad_tree(tmp_path)
    tr, va, _, _, _ = get_gpu_data_loaders(tmp_path, 3, 2, device='cpu', train_split=0.5, seed=0, image_size=32)
    seen = {}
    for bb in va:
        assert isinstance(bb, ByteBatch)
        for x, p in zip(bb.items(), bb.paths): seen[p] = x
    for p, x in seen.items(): assert torch.equal(x, read_image_bytes(p))
    assert len(seen) == len(va.dataset)


# ---------------------------------------------------------------- real Food-101 JPEGs

def test_loaders_match_cpu_split_on_real_data():
    "Same files, labels and classes as `data.get_data_loaders`."
    mini = need_mini()
    tr, va, c2i, tp, vp = get_gpu_data_loaders(mini, 16, 0, device='cpu', seed=42, max_per_class=12)
    ctr, cva, cc2i = get_data_loaders(mini, 16, 0, seed=42, max_per_class=12)
    assert (tr.dataset.samples, va.dataset.samples, c2i) == (ctr.dataset.samples, cva.dataset.samples, cc2i)
    assert tr.dataset.classes == ctr.dataset.classes
    xb, yb = tp(next(iter(tr)))
    assert xb.shape == (16, 3, 224, 224) and (xb >= LO - 1e-5).all() and (xb <= HI + 1e-5).all()


def test_val_pipeline_close_to_pil_on_real_jpegs():
    "Measured on the 150 JPEGs below: max |diff| 0.0175 (one grey level), mean 0.0028 after normalisation. Asserted: max <= 0.02, mean <= 0.004."
    mini = need_mini()
    files = sorted((mini / 'food-101' / 'images').glob('*/*.jpg'))[::4]
    items = [read_image_bytes(f) for f in files]
    assert all(x.dim() == 1 for x in items)  # every Food-101 file takes the device path
    xb, _ = GPUBatchPipeline(False, 'cpu')(items, [0] * len(items))
    vt = build_val_transform()
    ref = torch.stack([vt(load_image(f)) for f in files])
    d = (xb - ref).abs()
    assert d.max() <= 0.02 and d.mean() <= 0.004, (float(d.max()), float(d.mean()))


@pytest.mark.parametrize('threaded', [False, True])
def test_prefetcher_yields_every_image_once(threaded):
    "Serial and threaded prefetching, 2 worker processes: every validation image once, in order; a training epoch covers its samples."
    mini = need_mini()
    tr, va, _, tp, vp = get_gpu_data_loaders(mini, 16, 2, device='cpu', max_per_class=8, image_size=32)
    ys = torch.cat([y for _, y in DevicePrefetcher(va, vp, threaded=threaded)])
    assert ys.tolist() == va.dataset.targets
    n = sum(len(y) for x, y in DevicePrefetcher(tr, tp, threaded=threaded))
    assert n == len(tr.dataset) // 16 * 16  # the ragged last batch is dropped (BatchNorm, and no recompile under --compile)


# ---------------------------------------------------------------- issue 11 item 7: one augmentation spec, both pipelines

def _in_ranges(box, H, W, scale, ratio):
    "A rounded (h, w) box that an unrounded area in `scale`·H·W and an aspect in `ratio` can produce."
    t, l, h, w = box
    a_lo, a_hi = max(w - .5, 0) * max(h - .5, 0), (w + .5) * (h + .5)
    r_lo, r_hi = max(w - .5, 0) / (h + .5), (w + .5) / max(h - .5, 1e-9)
    return a_lo <= scale[1] * H * W and a_hi >= scale[0] * H * W and r_lo <= ratio[1] and r_hi >= ratio[0]


def _torchvision_fallback(H, W, ratio):
    "torchvision's centre crop when 10 attempts miss (what both paths use then)."
    r = W / H
    w, h = (W, round(W / ratio[0])) if r < ratio[0] else ((round(H * ratio[1]), H) if r > ratio[1] else (W, H))
    return ((H - h) // 2, (W - w) // 2, h, w)


@st.composite
def specs(draw):
    "An `AugmentSpec` as `TrainingConfig` validates it: 0 < scale_min <= scale_max <= 1, 0 < ratio_min <= ratio_max."
    s0 = draw(st.floats(0.01, 1.0)); s1 = draw(st.floats(s0, 1.0))
    r0 = draw(st.floats(0.2, 3.0)); r1 = draw(st.floats(r0, 4.0))
    return AugmentSpec((s0, s1), (r0, r1), draw(st.floats(0, 1)), (0.2, 0.2, 0.2))


@PROPS
@given(specs(), st.lists(st.tuples(st.integers(16, 400), st.integers(16, 400)), min_size=1, max_size=8), st.integers(0, 2**31))
def test_both_pipelines_draw_crops_within_the_configured_ranges(spec, sizes, seed):
    "The CPU transform built from a spec and the GPU pipeline built from the same spec draw crop areas and aspects in its ranges."
    cfg = TrainingConfig(crop_scale_min=spec.scale[0], crop_scale_max=spec.scale[1], crop_ratio_min=spec.ratio[0],
                         crop_ratio_max=spec.ratio[1], flip_prob=spec.flip_p, tracking_uri='sqlite:////unused.db')
    spec = AugmentSpec.from_config(cfg)                       # the fields both pipelines read
    rrc = build_train_transform(32, spec).transforms[0]       # CPU: torchvision's RandomResizedCrop, as configured
    assert (tuple(rrc.scale), tuple(rrc.ratio)) == (spec.scale, spec.ratio)
    torch.manual_seed(seed)
    cpu = [(tuple(rrc.get_params(torch.zeros(1, H, W), rrc.scale, rrc.ratio)), H, W) for H, W in sizes]
    _, tr, _, tp, _ = _gpu_pipelines(spec, seed)
    tp([_as_item(_encode(_rand_image(seed, H, W))) for H, W in sizes])   # GPU path (on CPU tensors): the real pipeline call
    p = tp.last_params
    gpu = [(tuple(b), H, W) for b, (H, W) in zip(p['boxes'].tolist(), sizes)]
    assert (tp.scale, tp.ratio, tp.flip_p) == (spec.scale, spec.ratio, spec.flip_p)
    for box, H, W in cpu + gpu:
        assert _in_ranges(box, H, W, spec.scale, spec.ratio) or box == _torchvision_fallback(H, W, spec.ratio), (box, H, W, spec)
    for fb, (box, H, W) in zip(p['fallback'].tolist(), gpu):
        if not fb: assert _in_ranges(box, H, W, spec.scale, spec.ratio), (box, H, W, spec)


def _gpu_pipelines(spec, seed):
    "`get_gpu_data_loaders`' pipelines for `spec` without a dataset: what `train.make_loaders` hands it."
    pipe = lambda train: GPUBatchPipeline(train, 'cpu', 32, 37, generator=make_generator(seed), scale=spec.scale,
                                          ratio=spec.ratio, flip_p=spec.flip_p, jitter=spec.jitter)
    return None, None, None, pipe(True), pipe(False)


def test_gpu_loaders_take_the_spec(tmp_path):
    "get_gpu_data_loaders passes the spec to its training pipeline (and the CPU loaders to their transform)."
    _bad_tree(tmp_path); root = tmp_path
    spec = AugmentSpec((0.3, 0.4), (0.9, 1.1), 0.0, (0.0, 0.1, 0.0))
    warnings.simplefilter('ignore')   # the tree's bad files
    *_, tp, vp = get_gpu_data_loaders(root, 2, 0, device='cpu', train_split=0.5, seed=0, image_size=32, augment=spec)
    assert (tp.scale, tp.ratio, tp.flip_p, tp.jitter) == (spec.scale, spec.ratio, spec.flip_p, spec.jitter)
    tr, _, _ = get_data_loaders(root, 2, 0, train_split=0.5, seed=0, image_size=32, augment=spec)
    rrc, flip = tr.dataset.transform.transforms[:2]
    assert (rrc.scale, rrc.ratio, flip.p) == (spec.scale, spec.ratio, spec.flip_p)


def test_crop_areas_cover_the_configured_range():
    "Over many draws the area fractions spread across [scale_min, scale_max] (the ranges are used, not just respected)."
    boxes, fb = sample_crop_boxes(torch.tensor([[300, 300]] * 4000), (0.3, 0.6), (0.9, 1.1), generator=make_generator(0))
    frac = (boxes[:, 2] * boxes[:, 3]).double() / 90000
    assert not fb.any() and 0.29 < frac.min() < 0.32 and 0.58 < frac.max() < 0.61


# ---------------------------------------------------------------- issue 12: memory, threaded prefetcher, the GPU checks on CPU

@PROPS
@given(st.lists(st.sampled_from([(20, 40), (31, 17), (9, 9), (64, 48)]), min_size=1, max_size=10), st.integers(1, 40),
       st.integers(0, 2**31), st.booleans())
def test_per_shape_roi_align_equals_the_canvas(shapes, size, seed, tiny_budget):
    "`crop_resize_groups` (one roi_align per shape, chunked) returns what one padded canvas returns."
    g = make_generator(seed)
    ims = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    boxes, _ = sample_crop_boxes(torch.tensor(shapes), generator=g)
    got = crop_resize_groups(ims, boxes, size, max_elements=1 if tiny_budget else 2**27)
    torch.testing.assert_close(got, crop_resize(pad_images(ims), boxes, size), atol=1e-3, rtol=0)


def test_threaded_and_serial_prefetchers_give_identical_training_batches(tmp_path):
    "The threaded prefetcher (what make_loaders uses) yields exactly the serial one's batches, epoch after epoch."
    _bad_tree(tmp_path); root = tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tr, _, _, tp, _ = get_gpu_data_loaders(root, 2, 0, device='cpu', train_split=0.5, seed=0, image_size=32, scan='full')
        runs = []
        for threaded in (False, True):
            pf, out = DevicePrefetcher(tr, tp, threaded=threaded), []
            for epoch in (1, 2):
                set_loader_epoch(pf, epoch); tp.reseed(100 + epoch)
                out += [(x.clone(), y.clone()) for x, y in pf]
            runs.append(out)
    assert len(runs[0]) == len(runs[1]) > 0
    for (xa, ya), (xb, yb) in zip(*runs): assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cuda_checks_run_on_the_cpu():
    "The functions tests/test_cuda.py runs on a GPU, here on CPU tensors: they pass, and the stress check can fail."
    files = cuda_checks.mini_files(40) if (cuda_checks.MINI / 'food-101/images').is_dir() else pytest.skip('no food-101-mini')
    assert cuda_checks.decode_agreement(files, 'cpu') == dict(max=0.0, mean=0.0, same_shapes=True)   # libjpeg both ways
    r = cuda_checks.val_vs_pil(files, 'cpu'); assert r['mean'] <= 0.004 and r['max'] <= 0.02
    assert cuda_checks.decode_race_stress(files, 'cpu', batches=3, batch_size=6, workers=0) == []
    assert len(cuda_checks.decode_race_stress(files, 'cpu', batches=3, batch_size=6, workers=0, corrupt=True)) == 3
    tr, va, _, tp, vp = get_gpu_data_loaders(cuda_checks.MINI, 8, 0, device='cpu', max_per_class=2, channels_last=True)
    assert cuda_checks.check_prefetched_batches(tr, tp, threaded=True) == len(tr) == 1   # 10 images: 8, the ragged 2 dropped
    assert cuda_checks.check_prefetched_batches(va, vp, threaded=False) == len(va) == 2


def test_probe_passes_on_real_jpegs_and_names_a_broken_decoder(monkeypatch):
    files = need_mini() and cuda_checks.mini_files(60)
    assert probe_gpu_pipeline(files, 'cpu') is None
    import nutrilearn_train.gpu_data as gd
    def broken(x, device): raise RuntimeError('nvjpeg: NVJPEG_STATUS_ARCH_MISMATCH (simulated)')
    monkeypatch.setattr(gd, '_decode_jpeg', broken)
    assert probe_gpu_pipeline(files, 'cpu') == ("it raised RuntimeError: the cpu JPEG decoder failed on every image of a batch that "
        "PIL decodes (RuntimeError: nvjpeg: NVJPEG_STATUS_ARCH_MISMATCH (simulated)); use --data-pipeline cpu (or auto, which "
        "falls back by itself)")


def test_augmentation_fields_are_logged_as_params():
    "The spec's fields are TrainingConfig fields, so `train` logs them with the other MLflow params."
    import types
    from nutrilearn_train.config import AUGMENT_HELP
    from nutrilearn_train.train import train_params
    cfg = TrainingConfig(crop_scale_min=0.3, jitter_contrast=0., tracking_uri='sqlite:////unused.db')
    dl = types.SimpleNamespace(dataset=[0] * 3)
    p = train_params(cfg, dl, dl)
    assert len(AUGMENT_HELP) == 8 and {k: p[k] for k in AUGMENT_HELP} == {k: getattr(cfg, k) for k in AUGMENT_HELP}
    assert (p['crop_scale_min'], p['jitter_contrast']) == (0.3, 0.)


def test_gpu_training_helper_runs_on_the_cpu(tmp_path):
    "tests/test_cuda.py's train-and-resume helper, on the CPU (where `auto` picks the CPU pipeline): 1 epoch, then a resume to 2."
    need_mini()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = cuda_checks.train_on_gpu_pipeline(cuda_checks.MINI, tmp_path, 'cpu', compile=False, epochs=1, max_per_class=2,
                                              batch_size=4, num_workers=0)
    assert r['tags']['data_pipeline'] == 'cpu' and r['resumed_run']
    assert [h['epoch'] for h in r['resumed']['history']] == [1, 2] and r['resumed']['history'][:1] == r['first']['history']
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in r['checkpoint_keys'])


# ---------------------------------------------------------------- issue 23: the GPU path, second pass

def test_race_harness_sends_one_copy_and_reads_nothing_back():
    "Item 1: the stress test's pipeline (meta device, fake decoder) makes one copy to the device and no read back; the old harness made two plain `.to()` copies, which the counter sees."
    files = need_mini() and cuda_checks.mini_files(60)
    bb = collate_bytes([(read_image_bytes(f), i, str(f)) for i, f in enumerate(files)])
    with cuda_checks.decoder(cuda_checks.FakeDecoder()), cuda_checks.DeviceWork('meta') as w:
        flat, shapes, labels = cuda_checks.DecodeOnly('meta')(bb)
    assert (w.n['h2d'], w.n['host_reads']) == (1, 0) and shapes.shape == (len(files), 3) and labels.shape == (len(files),)
    with cuda_checks.DeviceWork('meta') as w:
        torch.tensor([[3, 4, 5]]).to('meta'); torch.tensor([0]).to('meta')
    assert w.n['h2d'] == 2


def _meta_batch(shapes):
    "Meta-device images of `shapes`, and a fake decoder that hands them out."
    ims = [torch.empty(3, h, w, dtype=torch.uint8, device='meta') for h, w in shapes]
    return ims, lambda x, device: list(ims)


@pytest.mark.parametrize('train', [True, False])
def test_a_batch_is_one_copy_and_a_few_launches_per_shape(train):
    "Item 3: 64 Food-101-shaped images (3 shapes shared by 4 or more, 10 rarer ones): one copy to the device, no read back, and a launch count set by the shape groups, not the images: training ≈ 31 (21 of them the jitter) + 3 per group + one canvas for the 10 rare shapes (≈ 10 + 1 per image); validation ≈ 11 + 2 per shape."
    shapes = [(512, 512)] * 40 + [(512, 384)] * 10 + [(384, 512)] * 4 + [(300 + i, 512) for i in range(10)]
    ims, fake = _meta_batch(shapes)
    pipe = GPUBatchPipeline(train, 'meta', generator=make_generator(0), channels_last=True)
    with cuda_checks.decoder(fake), cuda_checks.DeviceWork('meta') as w:
        xb, yb = pipe([torch.zeros(4, dtype=torch.uint8)] * len(shapes), torch.arange(len(shapes)))
    chunks = gpu_data.shape_groups(shapes, min_group=4 if train else 1)
    assert (len(chunks), w.n['h2d'], w.n['host_reads']) == (4 if train else 13, 1, 0)
    assert w.n['ops'] <= (35 + 3 * len(chunks) + 10 + 10 if train else 15 + 2 * len(chunks)), dict(w.n)   # measured: 61, 37
    assert xb.shape == (64, 3, 224, 224) and xb.is_contiguous(memory_format=torch.channels_last) and yb.dtype == torch.long


@st.composite
def mixed_batches(draw):
    "2-24 decoded images whose shapes repeat (some shapes 4+ times, some once): every chunk kind of the training crop."
    pool = draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=5))
    shapes = draw(st.lists(st.sampled_from(pool), min_size=2, max_size=24))
    g = make_generator(draw(st.integers(0, 2**31)))
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]


@PROPS
@given(mixed_batches(), st.integers(1, 24), st.booleans(), st.integers(0, 2**31))
def test_fast_pipeline_equals_the_plain_composition(ims, size, train, seed):
    "Item 3: the grouped, packed pipeline returns what the public steps return on the same draws: training = pad_images + crop_resize + flip_batch + color_jitter_batch + normalize_batch; validation = resize_center_crop image by image + normalize_batch."
    pipe = GPUBatchPipeline(train, 'cpu', image_size=size, resize=size + 3, generator=make_generator(seed))
    xb, yb = pipe(ims, torch.arange(len(ims)) * 7)
    if train:
        p = pipe.last_params
        ref = color_jitter_batch(flip_batch(crop_resize(pad_images(ims), p['boxes'], size), p['flip']), p['factors'], p['order'])
    else: ref = torch.cat([resize_center_crop([im], size, size + 3) for im in ims])
    torch.testing.assert_close(xb, normalize_batch(ref), atol=2e-4, rtol=0)
    assert yb.tolist() == [7 * i for i in range(len(ims))]


def _small_photos(n=6):
    "`n` Food-101 photos shrunk to 160x120 (fast to decode), as PIL images."
    return [load_image(f).resize((160, 120)) for f in cuda_checks.mini_files(100)[:n]]


def test_damaged_jpegs_pil_rejects_never_reach_the_device():
    "Item 5: 1,800 JPEGs damaged at random (a few bytes in the header or the scan data; baseline, progressive, restart markers): every one PIL rejects goes to the CPU, where it is skipped as the CPU pipeline skips it."
    need_mini()
    rng, rejected, leaked = np.random.default_rng(0), 0, []
    for k, im in enumerate(_small_photos()):
        for kw in (dict(), dict(progressive=True), dict(restart_marker_blocks=2)):
            good = _encode(im, **kw); scan = gpu_data._walk_header(good)['scan']
            for where in ('header', 'scan'):
                for _ in range(50):
                    b = bytearray(good)
                    pos = int(rng.integers(2, scan)) if where == 'header' else int(rng.integers(scan, len(b) - 2))
                    b[pos:pos + 3] = rng.integers(0, 256, len(b[pos:pos + 3]), dtype=np.uint8).tobytes()
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore')
                        try: load_image(bytes(b)); continue
                        except BadImageError: rejected += 1
                    if device_decodable(bytes(b)): leaked.append((k, kw, where, pos))
    assert rejected >= 100 and not leaked, (rejected, leaked[:5])


def test_special_and_damaged_files_get_the_cpu_pipelines_verdict(tmp_path):
    "Item 5: RGB-stored, CMYK, rotated, damaged files ... through the GPU path with a device decoder that never fails (nvjpeg's worst case): skipped exactly when PIL rejects them, intact ones equal to PIL's output; with the old routing (start and end markers only) the check fails."
    corpus = cuda_checks.special_jpegs(tmp_path, need_mini() and cuda_checks.mini_files()[0])
    assert {k for _, k in corpus} >= {'rgb', 'rgb-ids', 'cmyk', 'rejected', 'damaged', 'restart', 'progressive'}
    with cuda_checks.decoder(cuda_checks.lenient_decode): assert cuda_checks.decode_parity(corpus, 'cpu') == []
    weak = lambda data, max_pixels=0: bytes(data[:3]) == b'\xff\xd8\xff' and b'\xff\xd9' in bytes(data[-1024:])
    with cuda_checks.decoder(cuda_checks.lenient_decode), mock.patch.object(gpu_data, 'device_decodable', weak):
        problems = cuda_checks.decode_parity(corpus, 'cpu')
    assert any('PIL rejects it, the GPU path decodes it' in p for p in problems) and any(p.startswith('rotated.jpg') for p in problems)


def test_a_jpeg_the_device_rejects_is_decoded_by_pil_counted_and_named():
    "Item 5: one file of a batch fails on the device, PIL reads it: the batch is whole, `decoded` counts it as 'pil' and a warning names it."
    good, odd = _encode(_rand_image(1, 30, 40)), _encode(_rand_image(2, 31, 41))
    real = gpu_data._decode_jpeg
    def picky(x, device):
        if any(len(t) == len(odd) for t in (x if isinstance(x, list) else [x])): raise RuntimeError('nvjpeg: NVJPEG_STATUS_BAD_JPEG (simulated)')
        return real(x, device)
    pipe = GPUBatchPipeline(False, 'cpu', 16, 18)
    with cuda_checks.decoder(picky), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); warnings.filterwarnings('ignore', category=DeprecationWarning)
        xb, yb = pipe([_as_item(good), _as_item(odd), pil_to_tensor(_rand_image(3, 9, 9))], [0, 1, 2], ['good.jpg', 'odd.jpg', 'png'])
    assert yb.tolist() == [0, 1, 2] and pipe.decoded == Counter(device=1, pil=1, cpu=1)
    assert [str(m.message) for m in w] == ['decoded odd.jpg with PIL on the CPU: the cpu JPEG decoder rejected it (RuntimeError: nvjpeg: NVJPEG_STATUS_BAD_JPEG (simulated))']


def _gpu_pipe(spec, **change):
    "A factory of GPU training pipelines at 64 px with `spec`, some fields changed (a deliberately wrong pipeline)."
    kw = {**dict(scale=spec.scale, ratio=spec.ratio, flip_p=spec.flip_p, jitter=spec.jitter), **change}
    return lambda seed: GPUBatchPipeline(True, 'cpu', 64, 73, generator=make_generator(seed), **kw)


class _BGR:
    "A pipeline whose output has its colour channels reversed (a decoder returning BGR)."
    def __init__(self, pipe): self.pipe = pipe
    def __call__(self, *a): xb, yb = self.pipe(*a); return xb.flip(1), yb


def test_augmentation_distribution_check_passes_and_can_fail():
    "Item 7: tests/test_cuda.py's distribution check, on CPU tensors: the GPU pipeline passes (every p >= 1e-4); flips, jitter or crops switched off, or BGR colours, fail it (some p < 1e-6)."
    files, spec = need_mini() and cuda_checks.mini_files(75), AugmentSpec()
    gap = cuda_checks.augmentation_gap(files, 'cpu', 128, 64, spec)
    assert min(gap.values()) >= 1e-4, gap
    for wrong in (_gpu_pipe(spec, flip_p=0.), _gpu_pipe(spec, jitter=(0., 0., 0.)), _gpu_pipe(spec, scale=(1., 1.), ratio=(0.1, 10.)),
                  lambda s: _BGR(_gpu_pipe(spec)(s))):
        gap = cuda_checks.augmentation_gap(files, 'cpu', 64, 64, spec, wrong)
        assert min(gap.values()) < 1e-6, gap
