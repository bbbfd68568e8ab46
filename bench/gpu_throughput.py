"""Benchmark (not a test): end-to-end training images/s with the CPU (PIL) and the GPU (nvjpeg) data pipelines.

    python bench/gpu_throughput.py                      # on a CUDA machine: all three backbones, writes bench/results/
    python bench/gpu_throughput.py --smoke              # CPU, tiny: proves the script runs; its numbers mean nothing

For each backbone, on one GPU, bf16 autocast (fp16 + GradScaler where bf16 is unsupported, e.g. a T4) and
channels_last, batch 256, Adam:
  (a) ceiling               the train step alone, on synthetic data already on the GPU
  (b) cpu_pipeline          data.ImageDataset + build_train_transform (PIL), all CPU cores as workers
  (c) gpu_pipeline          gpu_data.ByteDataset (workers only read bytes) + GPUBatchPipeline + DevicePrefetcher, all cores
  (d) gpu_pipeline_2workers (c) with 2 workers (the Colab case), and cpu_pipeline_2workers: (b) with 2 workers
  extra: gpu_pipeline_threaded / gpu_pipeline_2workers_threaded: (c) / (d) prepared in a background thread
Ratios printed and stored: (c)/(a), (c)/(b), (d)/(cpu_pipeline_2workers).

Data: real Food-101 JPEGs. The first run copies ../shared/data/food-101-mini (twice, 1,200 files, 58 MiB) into
bench/data/food101-bench (ignored by git, < 64 MiB so it can travel to a GPU machine: carry `bench/data`); later runs
reuse it. The training list repeats those files so an "epoch" is long
(a 1,000-image epoch would restart the workers every few batches, which a real 75k-image Food-101 epoch never does).
Each measurement runs for `--seconds` of wall time after `--warmup` steps and reports the steady-state rate over its
second half (the first batches come from queues the workers filled before the clock started).
Writes bench/results/<device>-<date>.json: {"device", "date", "results": {backbone: {ceiling, cpu_pipeline,
gpu_pipeline, cpu_pipeline_2workers, gpu_pipeline_2workers, ratios}}, "settings"}.
"""
import argparse, datetime, gc, json, os, re, shutil, sys, time
from pathlib import Path

import torch
from torch import nn

from nutrilearn_train.config import make_generator
from nutrilearn_train.data import ImageDataset, build_train_transform, folder_samples, make_loader
from nutrilearn_train.gpu_data import ByteDataset, DevicePrefetcher, GPUBatchPipeline, make_byte_loader
from nutrilearn_train.models import build_model

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / 'shared/data/food-101-mini'
BENCH_DATA = REPO / 'bench/data/food101-bench'
MAX_BYTES = 64 * 2**20


def prepare_data(src=MINI, dst=BENCH_DATA, n_images=1200, max_bytes=MAX_BYTES) -> Path:
    "Copy Food-101 JPEGs from `src` into an ImageFolder tree `dst`, repeating them up to `n_images` within `max_bytes`."
    if dst.is_dir() and any(dst.rglob('*.jpg')): return dst
    files = sorted((Path(src) / 'food-101/images').glob('*/*.jpg'))
    if not files: raise FileNotFoundError(f"no Food-101 JPEGs under {src}/food-101/images; pass --src")
    total, n = 0, 0
    while n < n_images:
        f = files[n % len(files)]
        size = f.stat().st_size
        if total + size > max_bytes: break
        out = dst / f.parent.name / f"{f.stem}_r{n // len(files)}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True); shutil.copyfile(f, out)
        total, n = total + size, n + 1
    print(f"prepared {n} JPEGs ({total / 2**20:.1f} MiB) in {dst}")
    return dst


def amp_dtype(device: torch.device):
    "bf16 where the GPU supports it, else fp16 (with a GradScaler); None (fp32) on the CPU."
    if device.type != 'cuda': return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_train_step(model_name, num_classes, device, dtype, compile=False):
    "A train step (channels_last, autocast, Adam) for `model_name`, independent of the trainer's internals."
    model = build_model(model_name, num_classes, pretrained=False).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    crit, fwd = nn.CrossEntropyLoss(), (torch.compile(model) if compile else model)
    def step(xb, yb):
        xb = xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        yb = yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = crit(fwd(xb), yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    return step


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def steady_rate(batches, step, device, seconds, warmup, min_steps=4) -> float:
    "Images/s over the second half of a `seconds`-long run of `step` on `batches` (after `warmup` steps)."
    it = iter(batches)
    for _ in range(warmup): step(*next(it))
    sync(device)
    stamps, sizes, t0 = [], [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(stamps) < min_steps:
        xb, yb = next(it)
        step(xb, yb); stamps.append(time.perf_counter()); sizes.append(len(yb))
    sync(device); t_end = time.perf_counter()
    h = len(stamps) // 2
    return sum(sizes[h + 1:]) / (t_end - stamps[h])


def synthetic(bs, device, num_classes, size=224):
    xb = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, num_classes, (bs,), device=device)
    while True: yield xb, yb


def endless(loader):
    while True: yield from loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['mobilenet_v2', 'efficientnet_b0', 'resnet50'])
    p.add_argument('--batch-size', type=int, default=256); p.add_argument('--seconds', type=float, default=10)
    p.add_argument('--warmup', type=int, default=3); p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--epoch-images', type=int, default=200_000, help='length of the repeated training list')
    p.add_argument('--src', default=str(MINI)); p.add_argument('--data', default=str(BENCH_DATA))
    p.add_argument('--device', default='cuda'); p.add_argument('--compile', action='store_true')
    p.add_argument('--out', default=str(REPO / 'bench/results'))
    p.add_argument('--no-threaded', action='store_true', help='skip the threaded-prefetcher variants (saves device time)')
    p.add_argument('--smoke', action='store_true', help='tiny CPU run that only proves the script works')
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.models, a.batch_size, a.seconds, a.warmup, a.workers = 'cpu', a.models[:1], 4, 2, 1, 2
        a.out = a.out if '--out' in (argv or sys.argv) else None
        print("CPU SMOKE RUN: proves the benchmark executes end to end. These numbers are NOT the benchmark "
              "(no GPU; 224 px training on 2 CPU cores). Run without --smoke on a CUDA machine.")
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("no CUDA device: run on a GPU machine, or use --smoke")
    data = prepare_data(Path(a.src), Path(a.data))
    samples = folder_samples(data)
    classes = sorted({c for _, c in samples}); c2i = {c: i for i, c in enumerate(classes)}
    reps = -(-a.epoch_images // len(samples))
    train = [(path, c2i[c]) for path, c in samples] * reps
    dtype = amp_dtype(device)
    steps = {m: make_train_step(m, len(classes), device, dtype, a.compile) for m in a.models}
    pin = device.type == 'cuda'

    def cpu_batches(workers):
        return make_loader(ImageDataset(train, classes, build_train_transform()), a.batch_size, True, workers, seed=0, pin_memory=pin)
    def gpu_batches(workers, threaded=False):
        pipe = GPUBatchPipeline(True, device, generator=make_generator(0), channels_last=True)
        return DevicePrefetcher(make_byte_loader(ByteDataset(train, classes), a.batch_size, True, workers, seed=0), pipe, threaded)
    configs = {'ceiling': lambda: None, 'cpu_pipeline': lambda: cpu_batches(a.workers), 'gpu_pipeline': lambda: gpu_batches(a.workers),
               'cpu_pipeline_2workers': lambda: cpu_batches(2), 'gpu_pipeline_2workers': lambda: gpu_batches(2),
               # extra fields: the same GPU pipeline prepared in a background thread (DevicePrefetcher(threaded=True))
               'gpu_pipeline_threaded': lambda: gpu_batches(a.workers, True), 'gpu_pipeline_2workers_threaded': lambda: gpu_batches(2, True)}
    if a.no_threaded: configs = {k: v for k, v in configs.items() if 'threaded' not in k}
    results = {m: {} for m in a.models}
    for name, make in configs.items():
        loader = make()
        for m in a.models:
            src = synthetic(a.batch_size, device, len(classes)) if loader is None else endless(loader)
            r = steady_rate(src, steps[m], device, a.seconds, a.warmup)
            results[m][name] = round(r, 1)
            print(f"{m:16s} {name:22s} {r:9.1f} images/s", flush=True)
            del src; gc.collect()
        del loader; gc.collect()
    for m, r in results.items():
        r['ratios'] = {'gpu_over_ceiling': r['gpu_pipeline'] / r['ceiling'], 'gpu_over_cpu': r['gpu_pipeline'] / r['cpu_pipeline'],
                       'gpu_2w_over_cpu_2w': r['gpu_pipeline_2workers'] / r['cpu_pipeline_2workers']}
        print(f"{m:16s} (c)/(a) {r['ratios']['gpu_over_ceiling']:.2f}  (c)/(b) {r['ratios']['gpu_over_cpu']:.2f}  "
              f"(d)/(cpu 2 workers) {r['ratios']['gpu_2w_over_cpu_2w']:.2f}")
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    date = datetime.date.today().isoformat()
    out = dict(device=name, date=date, results=results,
               settings=dict(batch_size=a.batch_size, workers_all=a.workers, cpu_count=os.cpu_count(), seconds=a.seconds,
                             amp=str(dtype), channels_last=True, compile=a.compile, images=len(samples),
                             torch=torch.__version__, smoke=a.smoke))
    if a.out is None: print(json.dumps(out, indent=1)); return 0
    path = Path(a.out) / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(out, indent=1) + '\n')
    print(f"wrote {path}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
