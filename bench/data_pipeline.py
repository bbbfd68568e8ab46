"""Benchmark (not a test): training-loader throughput on food-101-mini, ours vs a plain ImageFolder-style loader.

    python bench/data_pipeline.py [--data-dir ../shared/data/food-101-mini] [--epochs 2] [--repeats 4]

Both loaders read the same training samples (our stratified 80 % of the official train split) with the same
transform (`build_train_transform()`), batch size and worker count. "plain" is what a tutorial writes:
`Image.open(p).convert('RGB')` in a Dataset and a default `DataLoader(shuffle=True)`. Ours adds EXIF orientation,
the decompression-bomb guard, bad-image skipping, seeded workers and persistent workers. Throughput counts every
image of `--epochs` consecutive epochs, worker start-up included (it is a real per-epoch cost of a default loader);
each line shows the best run of each and the median ratio of `--repeats` back-to-back pairs (robust to load from
other processes on a shared machine). The one-off header scan is timed separately.
"""
import argparse, os, statistics, time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nutrilearn_train.data import build_train_transform, get_data_loaders, scan_images, set_loader_epoch

MINI = Path(__file__).resolve().parents[1].parent/'shared/data/food-101-mini'


class PlainImageFolder(Dataset):
    "The textbook dataset: open, convert to RGB, transform."
    def __init__(self, samples, transform): self.samples, self.transform = samples, transform
    def __len__(self): return len(self.samples)
    def __getitem__(self, i):
        path, y = self.samples[i]
        return self.transform(Image.open(path).convert('RGB')), y


def images_per_second(loader, epochs, ours):
    n, t0 = 0, time.perf_counter()
    for e in range(epochs):
        if ours: set_loader_epoch(loader, e)
        for xb, yb in loader: n += len(yb)
    return n / (time.perf_counter() - t0)


def paired(run_ours, run_plain, repeats):
    "Best images/s of each, and the median ours/plain ratio over back-to-back pairs (drift-robust)."
    o, q = [], []
    for r in range(repeats):  # alternate which goes first so neither always gets the warmer cache
        pair = (run_ours(), run_plain()) if r % 2 == 0 else tuple(reversed((run_plain(), run_ours())))
        o.append(pair[0]); q.append(pair[1])
    return max(o), max(q), statistics.median(a / b for a, b in zip(o, q))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-dir', default=str(MINI)); p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=2); p.add_argument('--repeats', type=int, default=4)
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    a = p.parse_args(argv)
    torch.manual_seed(0)
    probe, _, _ = get_data_loaders(a.data_dir, a.batch_size, 0, pin_memory=False)
    samples = probe.dataset.samples
    t0 = time.perf_counter(); good, bad = scan_images([p for p, _ in samples]); scan_s = time.perf_counter() - t0
    print(f"data: {a.data_dir}  train images: {len(samples)}  batch {a.batch_size}  epochs/run {a.epochs}  "
          f"repeats {a.repeats}  cpus {os.cpu_count()}  load avg {os.getloadavg()[0]:.1f}")
    print(f"header scan: {len(good)} good / {len(bad)} bad in {scan_s * 1e3:.0f} ms "
          f"({scan_s / len(samples) * 1e6:.0f} us/file, ≈ {scan_s / len(samples) * 101_000:.0f} s for all of Food-101)")
    print(f"{'workers':>9} {'ours img/s':>11} {'plain img/s':>12} {'ours/plain (median of pairs)':>29}")
    ours_ds, plain_ds = probe.dataset, PlainImageFolder(samples, build_train_transform())
    n = min(96, len(samples))
    def per_image(ds):  # the per-image work alone (load + transform), one thread, like a worker
        t0 = time.perf_counter()
        for i in range(n): ds[i]
        return n / (time.perf_counter() - t0)
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    o, q, r = paired(lambda: per_image(ours_ds), lambda: per_image(plain_ds), a.repeats)
    torch.set_num_threads(threads)
    print(f"{'0 (ds[i])':>9} {o:>11.1f} {q:>12.1f} {r:>29.2f}")
    for w in a.workers:
        ours = lambda: images_per_second(get_data_loaders(a.data_dir, a.batch_size, w, pin_memory=False)[0], a.epochs, True)
        plain = lambda: images_per_second(DataLoader(PlainImageFolder(samples, build_train_transform()), a.batch_size,
                                                     shuffle=True, num_workers=w), a.epochs, False)
        o, q, r = paired(ours, plain, a.repeats)
        print(f"{w:>9} {o:>11.1f} {q:>12.1f} {r:>29.2f}")


if __name__ == '__main__': main()
