"""Benchmark (not a test): the host cost per batch of `GPUBatchPipeline`, before and after issue 23, on CPU tensors.

    PYTHONPATH=. python3 bench/pipeline_cost.py                          # against the code at commit f3a823f
    PYTHONPATH=. python3 bench/pipeline_cost.py --before HEAD~3 --batch-size 128 --shapes all-distinct

The pipeline runs in the prefetcher's thread while the model trains, so what bounds images/s is its *host* time per
batch: Python, dispatch and launches, not the pixel arithmetic (the GPU does that on a side stream). A fake device
decoder hands the pipeline images whose shapes follow the Food-101 sample, each distinct photo shape made a tiny
distinct shape (2x2 outputs): the shape groups, launches and copies stay what they are, the arithmetic vanishes.
Measured for each version, in this process:
  host ms/batch        best wall time of one training (and one validation) batch over --reps, 1 CPU thread
  device ops/batch     operators run on the device tensors (each a kernel launch on CUDA), counted on the meta device
  copies to device     host-to-device copies per batch (each a pin + cudaMemcpyAsync on CUDA)
  host reads           device-to-host reads per batch (each a host synchronisation on CUDA): must be 0
The old code is read with `git show <rev>:nutrilearn_train/gpu_data.py`; both versions draw the same random
parameters, so their training outputs are also compared.
"""
import argparse, importlib.util, subprocess, sys, time
from collections import Counter
from pathlib import Path

import torch

import nutrilearn_train
from nutrilearn_train import gpu_data
from nutrilearn_train.config import make_generator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
from cuda_checks import DeviceWork   # the operator / copy / read-back counter the tests use

BASELINE = 'f3a823f'   # the last commit before issue 23's pipeline changes


def load_before(rev: str):
    "The gpu_data module as it was at `rev`, imported as a sibling of the current one."
    src = subprocess.run(['git', 'show', f'{rev}:nutrilearn_train/gpu_data.py'], cwd=REPO, capture_output=True, text=True)
    if src.returncode: sys.exit(f"cannot read nutrilearn_train/gpu_data.py at {rev!r} ({src.stderr.strip()}); run from a git checkout or pass --before REV")
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader('nutrilearn_train._gpu_data_before', loader=None))
    mod.__package__ = 'nutrilearn_train'
    exec(compile(src.stdout, f'gpu_data.py@{rev}', 'exec'), mod.__dict__)
    return mod


def photo_shapes(src: Path, n: int, kind: str, seed: int = 0) -> list:
    "`n` (height, width) pairs drawn from the photos under `src` ('food101'), or all different ('all-distinct')."
    if kind == 'all-distinct': return [(300 + i, 512) for i in range(n)]
    from PIL import Image
    files = sorted(src.rglob('*.jpg'))
    if not files: sys.exit(f"no JPEGs under {src}: pass --src pointing at food-101-mini")
    sizes = [Image.open(f).size[::-1] for f in files]
    g = make_generator(seed)
    return [sizes[i] for i in torch.randint(len(sizes), (n,), generator=g).tolist()]


def shrink(shapes: list) -> list:
    "Each distinct height and width mapped to a tiny distinct one (2, 3, ...): the same shape groups, almost no arithmetic."
    hs, ws = ({v: 2 + i for i, v in enumerate(sorted({s[k] for s in shapes}))} for k in (0, 1))
    return [(hs[h], ws[w]) for h, w in shapes]


class FakeDecoder:
    "Stands in for `gpu_data._decode_jpeg`: returns the prepared images, in order, for a list of (dummy) encoded items."
    def __init__(self, images): self.images = images
    def __call__(self, x, device): return list(self.images) if isinstance(x, list) else self.images[0]


def make_pipe(mod, train: bool, device, images: list):
    "`mod`'s pipeline on `device` with 2x2 outputs, its decoder replaced by one that returns `images`."
    mod._decode_jpeg = FakeDecoder(images)
    return mod.GPUBatchPipeline(train, device, image_size=2, resize=2, generator=make_generator(0))


def run_once(pipe, n: int):
    items = [torch.zeros(4, dtype=torch.uint8)] * n   # "encoded" placeholders: the fake decoder ignores them
    return pipe(items, torch.arange(n), [f'{i}.jpg' for i in range(n)])


def host_ms(versions: dict, train: bool, images: list, reps: int) -> dict:
    "Best-of-`reps` ms per batch of each version (timeit's rule: noise only adds), the versions interleaved."
    pipes = {k: make_pipe(m, train, 'cpu', images) for k, m in versions.items()}
    ts = {k: [] for k in versions}
    for r in range(reps + 3):
        for k, pipe in pipes.items():
            versions[k]._decode_jpeg = FakeDecoder(images)
            t = time.perf_counter(); run_once(pipe, len(images)); dt = time.perf_counter() - t
            if r >= 3: ts[k].append(dt)
    return {k: 1e3 * min(v) for k, v in ts.items()}


def counts(mod, train, shapes) -> Counter:
    images = [torch.empty(3, h, w, dtype=torch.uint8, device='meta') for h, w in shapes]
    pipe = make_pipe(mod, train, 'meta', images)
    with DeviceWork('meta') as c: run_once(pipe, len(images))
    return c.n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', default=str(REPO.parent / 'shared/data/food-101-mini'), help='photos whose shapes the batch copies')
    p.add_argument('--before', default=BASELINE, help='git revision of the old gpu_data.py')
    p.add_argument('--batch-size', type=int, default=256); p.add_argument('--reps', type=int, default=20)
    p.add_argument('--shapes', choices=('food101', 'all-distinct'), default='food101')
    a = p.parse_args(argv)
    torch.set_num_threads(1)   # the pipeline thread is one host thread; no OpenMP fan-out in the timings
    shapes = photo_shapes(Path(a.src), a.batch_size, a.shapes)
    g = make_generator(1)
    small = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shrink(shapes)]
    versions = {'before': load_before(a.before), 'after': gpu_data}
    keep = {k: m._decode_jpeg for k, m in versions.items()}
    rows = {k: {} for k in versions}
    try:
        for train in (True, False):
            k = 'train' if train else 'val'
            for name, ms in host_ms(versions, train, small, a.reps).items(): rows[name][f'{k} host ms/batch'] = ms
            for name, mod in versions.items():
                c = counts(mod, train, shapes)
                rows[name][f'{k} device ops/batch'], rows[name][f'{k} copies to device'], rows[name][f'{k} host reads'] = c['ops'], c['h2d'], c['host_reads']
        for name, mod in versions.items(): rows[name]['train output'] = run_once(make_pipe(mod, True, 'cpu', small), len(small))[0]
    finally:
        for k, m in versions.items(): m._decode_jpeg = keep[k]
    groups = len(set(shapes))
    print(f"batch of {a.batch_size} images, {groups} distinct shapes ({a.shapes}); before = {a.before}, after = working tree "
          f"({Path(nutrilearn_train.__file__).parent})")
    print(f"{'':28s}{'before':>10s}{'after':>10s}{'before/after':>14s}")
    for k in rows['before']:
        if k == 'train output': continue
        b, f = rows['before'][k], rows['after'][k]
        ratio = f"{b / f:.1f}x" if f else ('-' if not b else 'inf')
        print(f"{k:28s}{b:10.2f}{f:10.2f}{ratio:>14s}" if isinstance(b, float) else f"{k:28s}{b:10d}{f:10d}{ratio:>14s}")
    d = (rows['before']['train output'] - rows['after']['train output']).abs().max().item()
    print(f"training outputs, same random draws: max |before - after| = {d:.2e} (normalised units)")
    for k in ('train', 'val'):
        print(f"{k}: the host cost alone caps the pipeline at {1e3 * a.batch_size / rows['before'][f'{k} host ms/batch']:,.0f} "
              f"-> {1e3 * a.batch_size / rows['after'][f'{k} host ms/batch']:,.0f} images/s on this CPU")
    print("on CUDA each copy to the device adds a pin_memory and a cudaMemcpyAsync to the host time, and each operator a "
          "kernel launch; a host read would stall the pipeline thread until the GPU caught up")
    return 0


if __name__ == '__main__':
    sys.exit(main())
