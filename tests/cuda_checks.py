"""What `tests/test_cuda.py` checks on a GPU, written as device-agnostic functions so that `tests/test_gpu_data.py`
runs them on CPU tensors too (there they prove the checks work and can fail; the GPU-specific part is the device).

Needs only torch, torchvision, numpy and Pillow (no mlflow, nbdev, tqdm or scipy): a bare GPU machine runs it.
The Food-101 sample is `../shared/data/food-101-mini` beside the repository, or `$NUTRILEARN_MINI`.
"""
import contextlib, dataclasses, io, math, os, warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.io import ImageReadMode, decode_jpeg

from nutrilearn_train import gpu_data
from nutrilearn_train.config import make_generator
from nutrilearn_train.data import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, BadImageError, build_train_transform,
                                   build_val_transform, load_image)
from nutrilearn_train.gpu_data import (ByteDataset, DevicePrefetcher, GPUBatchPipeline, collate_bytes, compare_outputs,
                                       decode_items, jpeg_header, make_byte_loader, read_image_bytes, to_device)

MINI = Path(os.environ.get('NUTRILEARN_MINI') or Path(__file__).resolve().parents[1].parent / 'shared/data/food-101-mini')
LO = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
HI = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)


def mini_files(every: int = 1) -> list:
    "The sample's JPEGs, sorted (every `every`-th one)."
    return sorted((MINI / 'food-101/images').glob('*/*.jpg'))[::every]


def decode_agreement(files, device) -> dict:
    "Grey-level differences between decoding `files` on `device` and on the CPU (libjpeg-turbo): max, mean, shapes equal."
    enc, names = [read_image_bytes(f) for f in files], [str(f) for f in files]
    dev, _ = decode_items(enc, names, device)
    cpu, _ = decode_items(enc, names, 'cpu')
    d = torch.cat([(g.cpu().float() - c.float()).abs().flatten() for g, c in zip(dev, cpu)])
    return dict(max=d.max().item(), mean=d.mean().item(), same_shapes=all(g.shape == c.shape for g, c in zip(dev, cpu)))


def val_vs_pil(files, device) -> dict:
    "Normalised-unit differences between the GPU validation pipeline on `device` and PIL's `build_val_transform`."
    xb, _ = GPUBatchPipeline(False, device)([read_image_bytes(f) for f in files], None, [str(f) for f in files])
    ref = torch.stack([build_val_transform()(load_image(f)) for f in files])
    d = (xb.cpu() - ref).abs()
    return dict(max=d.max().item(), mean=d.mean().item())


def check_prefetched_batches(loader, pipeline, threaded: bool) -> int:
    "Assert every batch of the prefetcher is on the pipeline's device, channels-last (if asked), 224 px, in bounds; the count."
    n = 0
    for xb, yb in DevicePrefetcher(loader, pipeline, threaded=threaded):
        assert xb.device.type == pipeline.device.type and xb.shape[1:] == (3, pipeline.image_size, pipeline.image_size)
        if pipeline.channels_last: assert xb.is_contiguous(memory_format=torch.channels_last)
        lo, hi = LO.to(xb.device), HI.to(xb.device)
        assert (xb >= lo - 1e-4).all() and (xb <= hi + 1e-4).all() and len(yb) == len(xb)
        n += 1
    return n


# ---------------------------------------------------------------- item 1: the decode race, and a stress test that can fail

def unsynchronised_decode(x, device):
    "`decode_jpeg` used as torchvision documents it, with work still queued on the current stream: pytorch/vision#9606's unsafe case."
    return decode_jpeg(x, mode=ImageReadMode.RGB, device=device)


class DecodeOnly:
    """A prefetcher pipeline that only decodes: `(all pixels back to back, [B, 3] shapes, [B] item indices)` on `device`.

    It makes no host synchronisation of its own: its one copy to the device is pinned and non-blocking. A blocking copy
    (`tensor.to('cuda')`) would wait for the work queued before it, so the next batch's decode would always find the
    stream idle and the race this exists to provoke could never happen."""
    def __init__(self, device, corrupt: bool = False):
        self.device, self.corrupt = torch.device(device), corrupt   # corrupt: mirror one image (proves the check fails)
    def __call__(self, batch):
        ims, kept = decode_items(batch.items(), batch.paths, self.device)
        if self.corrupt and len(ims) > 1: ims[0] = ims[0].flip(-1)
        if self.device.type == 'cuda':   # keep this stream busy, so the reads below are still queued when the next decode runs
            a = torch.randn(4096, 4096, device=self.device)
            for _ in range(5): a = a @ a / 64
        flat = torch.cat([im.flatten() for im in ims])   # queued after the matmuls; `ims` go back to the allocator on return
        meta = to_device(torch.cat([torch.tensor([tuple(im.shape) for im in ims]).flatten(), batch.labels[kept]]), self.device)
        return flat, meta[:3 * len(ims)].view(-1, 3), meta[3 * len(ims):]


@contextlib.contextmanager
def decoder(fn):
    "Inside the block the pipeline decodes with `fn` in place of `gpu_data._decode_jpeg` (None: unchanged)."
    real = gpu_data._decode_jpeg
    if fn is not None: gpu_data._decode_jpeg = fn
    try: yield
    finally: gpu_data._decode_jpeg = real


def decode_race_stress(files, device, batches: int = 200, batch_size: int = 64, workers: int = 2,
                       tolerance: float = 2.0, corrupt: bool = False, decode=None) -> list:
    """Decode `batches` batches of `files` (repeated) through the threaded prefetcher on `device`, compare every image
    with a CPU decode of the same bytes; the `(path, mean grey-level difference)` of each image beyond `tolerance`.
    `decode` replaces the pipeline's decoder (`unsynchronised_decode`: the negative control, which must fail on CUDA).

    The consumer allocates and frees memory between batches, as a training step does, so that a decode writing into a
    block still in use (pytorch/vision#9606) shows up as a wrong image."""
    files = list(files)
    samples = [(files[i % len(files)], i) for i in range(batches * batch_size)]   # label = position: finds the file back
    loader = make_byte_loader(ByteDataset(samples, ['x']), batch_size, False, workers, seed=0)
    ref, bad = {}, []
    with decoder(decode):
        for flat, shapes, labels in DevicePrefetcher(loader, DecodeOnly(device, corrupt), threaded=True):
            scratch = torch.empty(len(flat) // 2 + 1, dtype=torch.uint8, device=flat.device).fill_(7)   # churn the allocator
            start = 0
            for (c, h, w), k in zip(shapes.long().tolist(), labels.long().tolist()):
                f = samples[k][0]
                if f not in ref: ref[f] = decode_items([read_image_bytes(f)], [str(f)], 'cpu')[0][0]
                got = flat[start:start + c * h * w].view(c, h, w).cpu().float()
                start += c * h * w
                diff = (got - ref[f].float()).abs().mean().item() if got.shape == ref[f].shape else float('inf')
                if diff > tolerance: bad.append((str(f), diff))
            del scratch
    return bad


def host_sync_error(fn, *args):
    "On CUDA: None if `fn(*args)` makes no host synchronisation besides the decoder's own (vision#9606), else torch's error naming the call."
    real = gpu_data._decode_jpeg
    def exempt(x, device):   # the deliberate wait before each decode
        torch.cuda.set_sync_debug_mode(0)
        try: return real(x, device)
        finally: torch.cuda.set_sync_debug_mode('error')
    with decoder(exempt):
        torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode('error')
        try: fn(*args)
        except RuntimeError as e: return str(e)
        finally: torch.cuda.set_sync_debug_mode(0)
    return None


class DeviceWork(TorchDispatchMode):
    "Counts, while active: operators on `device` tensors (kernel launches on CUDA), copies to it from the host, and reads back."
    VIEWS = {'view', 'slice', 'select', 'unsqueeze', 'squeeze', 'expand', 'as_strided', 'split', 'split_with_sizes', 't',
             'permute', 'alias', 'detach', '_unsafe_view', 'unbind', 'transpose', 'lift_fresh', 'reshape'}
    def __init__(self, device='meta'):
        super().__init__(); self.device, self.n = torch.device(device), Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, func.__name__.split('.')[0]
        ts = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if name in ('_local_scalar_dense', 'nonzero', 'masked_select') and any(t.device == self.device for t in ts): self.n['host_reads'] += 1
        out = func(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]
        src = ts[-1 if name == 'copy_' else 0] if ts else None
        if name in ('_to_copy', 'copy_') and src is not None and src.device.type == 'cpu' and any(o.device == self.device for o in outs + ts):
            self.n['h2d'] += 1
        elif name not in self.VIEWS and any(t.device == self.device for t in ts + outs): self.n['ops'] += 1
        return out


class FakeDecoder:
    "A device decoder for the meta device: [3, H, W] uint8 images of the headers' sizes, nothing decoded."
    def __call__(self, x, device):
        one = lambda t: (lambda h: torch.empty(3, h['height'], h['width'], dtype=torch.uint8, device=device))(jpeg_header(bytes(t.numpy())))
        return [one(t) for t in x] if isinstance(x, list) else one(x)


# ---------------------------------------------------------------- item 5: JPEGs the device must not decode, damaged files

def _encode(im, **kw) -> bytes:
    b = io.BytesIO(); im.save(b, 'JPEG', **kw); return b.getvalue()


def _pil_rejects(data: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try: load_image(data); return False
        except BadImageError: return True


def _damaged(good: bytes, where: str, want_rejected: bool, n: int, seed: int) -> list:
    "`n` copies of `good` with a few random bytes in its header (`where='header'`) or scan data, that PIL rejects (or reads)."
    rng, scan, out = np.random.default_rng(seed), gpu_data._walk_header(good)['scan'], []
    for _ in range(100_000):
        if len(out) == n: return out
        b = bytearray(good)
        pos = int(rng.integers(2, scan)) if where == 'header' else int(rng.integers(scan, len(b) - 2))
        b[pos:pos + 3] = rng.integers(0, 256, len(b[pos:pos + 3]), dtype=np.uint8).tobytes()
        if _pil_rejects(bytes(b)) == want_rejected: out.append(bytes(b))
    raise RuntimeError(f"found only {len(out)} of {n} damaged files in 100,000 tries")


def special_jpegs(root, photo=None) -> list:
    """Write the files the device decoder must not get wrong under `root`; `(path, kind)` pairs. Kinds: 'plain',
    'grey', 'progressive', 'restart', 'rotated', 'rgb' (Adobe transform 0), 'rgb-ids' (no marker, ids R, G, B),
    'cmyk', 'png', 'rejected' (damaged so that PIL refuses it, in the header or the scan data) and 'damaged' (PIL
    still reads it)."""
    from PIL import Image
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    grad = Image.linear_gradient('L')
    im = (load_image(photo) if photo else Image.merge('RGB', [grad, Image.radial_gradient('L'), grad.rotate(90)])).resize((160, 120))
    ex = Image.Exif(); ex[0x0112] = 6
    rgb = _encode(im, keep_rgb=True)
    if not (jpeg_header(rgb) or {}).get('rgb'): raise RuntimeError("this Pillow cannot write RGB-stored JPEGs (keep_rgb needs Pillow >= 10.2)")
    p = rgb.index(b'\xff\xee')
    files = dict(plain=_encode(im), grey=_encode(im.convert('L')), progressive=_encode(im, progressive=True),
                 restart=_encode(im, restart_marker_blocks=2), rotated=_encode(im, exif=ex.tobytes()), rgb=rgb,
                 **{'rgb-ids': rgb[:p] + rgb[p + 2 + int.from_bytes(rgb[p + 2:p + 4], 'big'):]}, cmyk=_encode(im.convert('CMYK')))
    out = []
    for kind, data in files.items(): (root / f'{kind}.jpg').write_bytes(data); out.append((root / f'{kind}.jpg', kind))
    b = io.BytesIO(); im.save(b, 'PNG'); (root / 'png.jpg').write_bytes(b.getvalue()); out.append((root / 'png.jpg', 'png'))
    for i, data in enumerate(_damaged(files['plain'], 'header', True, 4, 0) + _damaged(files['plain'], 'scan', True, 4, 1)
                             + _damaged(files['progressive'], 'scan', True, 2, 2)):
        (root / f'rejected{i}.jpg').write_bytes(data); out.append((root / f'rejected{i}.jpg', 'rejected'))
    for i, data in enumerate(_damaged(files['plain'], 'scan', False, 3, 3)):
        (root / f'damaged{i}.jpg').write_bytes(data); out.append((root / f'damaged{i}.jpg', 'damaged'))
    return out


def lenient_decode(x, device):
    "A device decoder that never fails (nvjpeg's worst case): what libjpeg cannot decode comes out as noise of the header's size."
    def one(t):
        try: return decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            h = jpeg_header(bytes(t.numpy())) or dict(height=8, width=8)
            return torch.randint(0, 256, (3, h['height'] or 8, h['width'] or 8), dtype=torch.uint8, device=device)
    return [one(t) for t in x] if isinstance(x, list) else one(x)


def decode_parity(corpus, device, image_size: int = 64) -> list:
    """Problems (none: an empty list) when the files of `corpus` (`special_jpegs`) go through the GPU path on `device`
    as in training (`ByteDataset`, a strict validation pipeline), compared with the CPU pipeline: a file that PIL
    rejects but comes out, one that PIL reads but is skipped, an intact file whose output differs from PIL's beyond
    `PROBE_TOLERANCE`, or an intact device-decodable file that needed PIL."""
    resize = round(image_size * 256 / 224)
    vt, pipe = build_val_transform(image_size, resize), GPUBatchPipeline(False, device, image_size, resize, strict_decode=True)
    ds, problems = ByteDataset([(p, i) for i, (p, _) in enumerate(corpus)], ['x']), []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for i, (path, kind) in enumerate(corpus):
            try: ref = vt(load_image(path))
            except BadImageError: ref = None
            item, pil_before = ds[i], pipe.decoded['pil']
            xb, yb = pipe(collate_bytes([item])) if item is not None else (None, [])
            out = xb[0].cpu() if len(yb) else None
            if (ref is None) != (out is None): problems.append(f"{path.name}: PIL {'rejects' if ref is None else 'reads'} it, the GPU path {'skips' if out is None else 'decodes'} it")
            elif kind not in ('rejected', 'damaged') and out is not None:
                if (why := compare_outputs(out[None], ref[None])) is not None: problems.append(f"{path.name}: {why}")
                if item[0].dim() == 1 and pipe.decoded['pil'] > pil_before: problems.append(f"{path.name}: the device decoder rejected it")
    return problems


# ---------------------------------------------------------------- item 7: the augmentation's distribution on the device

STATISTICS = ('mean_r', 'mean_g', 'mean_b', 'std_r', 'std_g', 'std_b', 'colourfulness', 'centroid_x', 'centroid_y', 'structure')


def augment_statistics(xb: torch.Tensor) -> torch.Tensor:
    """[N, 10] per normalised image: channel means and standard deviations (crop, brightness, contrast), mean |colour −
    grey| (saturation), the luminance centroid (x: flips, crop position), and the mean step between neighbours of the
    luminance pooled to 16×16 (zoom: the crop scale; pooled so that the resampling filters' sharpness does not count)."""
    x = xb.float().cpu() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    g = (x * torch.tensor(gpu_data._GRAY).view(1, 3, 1, 1)).sum(1)
    H, W = g.shape[1:]
    tot = g.sum((1, 2)) + 1e-6
    cx, cy = (g * torch.linspace(-.5, .5, W)).sum((1, 2)) / tot, (g * torch.linspace(-.5, .5, H)[:, None]).sum((1, 2)) / tot
    p = torch.nn.functional.avg_pool2d(g[:, None], max(1, W // 16))[:, 0]
    return torch.stack([*x.mean((2, 3)).T, *x.std((2, 3)).T, (x - g[:, None]).abs().mean((1, 2, 3)), cx, cy,
                        (p[:, :, 1:] - p[:, :, :-1]).abs().mean((1, 2))], 1)


def ks_pvalue(a, b) -> float:
    "Two-sample Kolmogorov–Smirnov p-value (asymptotic, Stephens' correction), numpy only."
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    z = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, z, 'right') / len(a) - np.searchsorted(b, z, 'right') / len(b)).max()
    ne = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    return float(min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101)))))


def fisher(ps) -> float:
    "Fisher's combined p-value of independent p-values `ps` (chi-squared with 2k degrees of freedom, closed form)."
    x = -sum(math.log(max(p, 1e-300)) for p in ps)   # = chi2 / 2
    return float(math.exp(-x) * sum(x ** j / math.factorial(j) for j in range(len(ps))))


def augmentation_gap(files, device, draws: int = 128, image_size: int = 224, spec: AugmentSpec = AugmentSpec(),
                     pipeline=None, seed: int = 0) -> dict:
    """`{statistic: p}`: for each of `augment_statistics`, Fisher's combination over `files` of KS p-values between
    `draws` training augmentations of the file by the CPU pipeline (PIL, `build_train_transform(spec)`) and by the
    GPU pipeline on `device`. `pipeline(seed)` builds the latter (default: `GPUBatchPipeline` with `spec`). A small p
    says the two draw different distributions; comparing file by file keeps the photos' own variety out of it."""
    resize = round(image_size * 256 / 224)
    make = pipeline or (lambda s: GPUBatchPipeline(True, device, image_size, resize, generator=make_generator(s), scale=spec.scale,
                                                   ratio=spec.ratio, flip_p=spec.flip_p, jitter=spec.jitter))
    tt, ps = build_train_transform(image_size, spec), []
    torch.manual_seed(seed)
    for k, f in enumerate(files):
        im = load_image(f)
        cpu = augment_statistics(torch.stack([tt(im) for _ in range(draws)]))
        gpu = augment_statistics(make(seed + k)([read_image_bytes(f)] * draws)[0])
        ps.append([ks_pvalue(cpu[:, i], gpu[:, i]) for i in range(len(STATISTICS))])
    return {s: fisher([p[i] for p in ps]) for i, s in enumerate(STATISTICS)}


def train_on_gpu_pipeline(data_dir, tmp, device, compile: bool, epochs: int = 2, max_per_class: int = 20,
                          batch_size: int = 32, image_pipeline: str = 'auto', num_workers: int = 2) -> dict:
    "Train mobilenet_v2 for `epochs` on `device` through `train()` with an in-memory tracker, then resume one epoch more."
    from nutrilearn_train import tracking
    from nutrilearn_train.config import TrainingConfig
    from nutrilearn_train.train import read_checkpoint, train
    tmp = Path(tmp)
    cfg = TrainingConfig(data_dir=str(data_dir), model_name='mobilenet_v2', pretrained=False, epochs=epochs, batch_size=batch_size,
                         num_workers=num_workers, max_per_class=max_per_class, device=str(torch.device(device).type),
                         data_pipeline=image_pipeline, mixed_precision=True, compile=compile, checkpoint_dir=str(tmp / 'ck'),
                         output_dir=str(tmp / 'out'), tracking_uri=f'sqlite:///{tmp}/unused.db')
    t = tracking.InMemoryTracker()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        first = train(cfg, t, progress=False)
        ck = read_checkpoint(tmp / 'ck/last.pth')
        t2 = tracking.InMemoryTracker()
        resumed = train(dataclasses.replace(cfg, epochs=epochs + 1), t2, resume='last', progress=False)
    return dict(first=first, resumed=resumed, tags=t.tags, checkpoint_keys=list(ck['model_state_dict']),
                resumed_run=t2.run_id == t.run_id)
