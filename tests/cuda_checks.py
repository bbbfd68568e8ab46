"""What `tests/test_cuda.py` checks on a GPU, written as device-agnostic functions so that `tests/test_gpu_data.py`
runs them on CPU tensors too (there they prove the checks work and can fail; the GPU-specific part is the device).

Needs only torch, torchvision, numpy and Pillow (no mlflow, nbdev or tqdm): a bare GPU machine runs it.
The Food-101 sample is `../shared/data/food-101-mini` beside the repository, or `$NUTRILEARN_MINI`.
"""
import dataclasses, os, warnings
from pathlib import Path

import torch

from nutrilearn_train.data import IMAGENET_MEAN, IMAGENET_STD, build_val_transform, load_image
from nutrilearn_train.gpu_data import (ByteDataset, DevicePrefetcher, GPUBatchPipeline, decode_items, make_byte_loader,
                                       read_image_bytes)

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


class DecodeOnly:
    "A prefetcher pipeline that only decodes: `(all pixels back to back, [B, 3] shapes, [B] item indices)` on `device`."
    def __init__(self, device, corrupt: bool = False):
        self.device, self.corrupt = torch.device(device), corrupt   # corrupt: swap two images' bytes (proves the check fails)
    def __call__(self, batch):
        ims, kept = decode_items(batch.items(), batch.paths, self.device)
        if self.corrupt and len(ims) > 1: ims[0] = ims[0].flip(-1)
        if self.device.type == 'cuda':   # keep this stream busy, so the copy below is still queued when the next decode runs
            a = torch.randn(4096, 4096, device=self.device)
            for _ in range(5): a = a @ a / 64
        flat = torch.cat([im.flatten() for im in ims])   # queued on the prefetcher's stream, after which `ims` are freed
        shapes = torch.tensor([tuple(im.shape) for im in ims]).to(self.device)
        return flat, shapes, batch.labels[kept].to(self.device)


def decode_race_stress(files, device, batches: int = 200, batch_size: int = 64, workers: int = 2,
                       tolerance: float = 2.0, corrupt: bool = False) -> list:
    """Decode `batches` batches of `files` (repeated) through the threaded prefetcher on `device`, compare every image
    with a CPU decode of the same bytes; the `(path, mean grey-level difference)` of each image beyond `tolerance`.

    The consumer allocates and frees memory between batches, as a training step does, so that a decode writing into a
    block still in use (pytorch/vision#9606) shows up as a wrong image."""
    files = list(files)
    samples = [(files[i % len(files)], i) for i in range(batches * batch_size)]   # label = position: finds the file back
    loader = make_byte_loader(ByteDataset(samples, ['x']), batch_size, False, workers, seed=0)
    ref = {}
    bad = []
    for flat, shapes, labels in DevicePrefetcher(loader, DecodeOnly(device, corrupt), threaded=True):
        scratch = torch.empty(len(flat) // 2 + 1, dtype=torch.uint8, device=flat.device).fill_(7)   # churn the allocator
        start = 0
        for (c, h, w), k in zip(shapes.tolist(), labels.tolist()):
            f = samples[k][0]
            if f not in ref: ref[f] = decode_items([read_image_bytes(f)], [str(f)], 'cpu')[0][0]
            got = flat[start:start + c * h * w].view(c, h, w).cpu().float()
            start += c * h * w
            diff = (got - ref[f].float()).abs().mean().item() if got.shape == ref[f].shape else float('inf')
            if diff > tolerance: bad.append((str(f), diff))
        del scratch
    return bad


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
