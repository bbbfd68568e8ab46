"""Benchmark (not a test): training images/s with the CPU (PIL) and the GPU (nvjpeg) data pipelines, on one GPU.

    PYTHONPATH=. python3 bench/gpu_throughput.py --src ../shared/data/food-101-mini --out bench/results --seconds 10
    PYTHONPATH=. python3 bench/gpu_throughput.py --src ../shared/data/food-101-mini --out /tmp/b --device cpu --seconds 2 \\
        --models mobilenet_v2 --batch-size 8 --image-size 64      # CPU smoke: proves it runs; its numbers mean nothing

Runs from a plain copy of the repository on a machine with only torch, torchvision, numpy and Pillow (no mlflow, nbdev
or tqdm). `--src` is the Food-101 sample (`food-101/images/<class>/*.jpg`); the long training list is built in memory
by repeating its files (nothing is copied into the repository), so an "epoch" never restarts the workers mid-run.

For each backbone (bf16 autocast where the GPU computes bf16 natively, else fp16 + GradScaler; channels_last; Adam):
  ceiling               the train step alone, on synthetic data already on the GPU
  cpu_pipeline          data.ImageDataset + build_train_transform (PIL) with all CPU cores as workers
  gpu_pipeline          gpu_data.ByteDataset (workers only read bytes) + GPUBatchPipeline + threaded DevicePrefetcher
                        (what `nutrilearn-train` uses on CUDA), all cores
  cpu_pipeline_2workers / gpu_pipeline_2workers     the same with 2 workers (a Colab VM)
  ratios                gpu/ceiling, gpu/cpu, gpu_2w/cpu_2w
New top-level fields:
  pipeline_only         {all_workers, 2workers}: images/s of the threaded prefetcher loop alone (no model), GPU pipeline
  train_epoch           the real `train.train_epoch` (StepGuard, clipping, device-side sums, the optimizer `fit` builds)
                        on the GPU pipeline for the first backbone: the number users get, not only an upper bound
  versions, settings, complete (false until the last measurement is written)
Every measurement syncs the device before its timer starts and after it stops, and the JSON file
(`--out/<device>-<date>.json`) is rewritten after each one, so a run cut short by a timeout keeps what it measured.
Time: 5 measurements per backbone + 4, each `--seconds` long plus warm-up: about 4 minutes for all three backbones at
the default 10 s on one H200 (under the 6-minute budget).
"""
import argparse, datetime, gc, json, os, platform, re, sys, time
from pathlib import Path

import torch
import torchvision
from torch import nn

from nutrilearn_train.config import make_generator
from nutrilearn_train.data import ImageDataset, build_train_transform, food101_samples, folder_samples, make_loader
from nutrilearn_train.gpu_data import ByteDataset, DevicePrefetcher, GPUBatchPipeline, make_byte_loader
from nutrilearn_train.models import build_model
from nutrilearn_train.train import StepGuard, _bf16_native, amp_dtype_for, build_optimizer, train_epoch

MODELS = ('mobilenet_v2', 'efficientnet_b0', 'resnet50')


def sample_list(src: Path) -> tuple:
    "`(samples, classes)`: `(path, label)` pairs of the Food-101 sample (or an ImageFolder tree) under `src`."
    src = Path(src)
    base = src / 'food-101' if (src / 'food-101/meta/train.json').is_file() else src
    pairs = (food101_samples(base, 'train') + food101_samples(base, 'test')) if (base / 'meta/train.json').is_file() else folder_samples(src)
    if not pairs: raise SystemExit(f"no images under {src}: pass --src pointing at food-101-mini (holding food-101/images)")
    classes = sorted({c for _, c in pairs})
    return [(p, classes.index(c)) for p, c in pairs], classes


def amp_dtype(device: torch.device):
    "What `train.amp_settings` picks: bf16 where native, else fp16 (GradScaler); None (fp32) on the CPU."
    if device.type != 'cuda': return None
    return amp_dtype_for(torch.cuda.get_device_capability(device), _bf16_native(device))


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def make_train_step(model_name, num_classes, device, dtype, compile=False):
    "A minimal train step (channels_last, autocast, Adam), independent of the trainer: the model's ceiling."
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


def steady_rate(batches, step, device, seconds, warmup, min_steps=4) -> float:
    "Images/s over the second half of a `seconds`-long run of `step` on `batches` (after `warmup` steps; synced timers)."
    it = iter(batches)
    for _ in range(warmup): step(*next(it))
    sync(device)
    stamps, sizes, t0 = [], [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(stamps) < min_steps:
        xb, yb = next(it)
        step(xb, yb)
        stamps.append(time.perf_counter()); sizes.append(len(yb))
    sync(device); t_end = time.perf_counter()
    h = len(stamps) // 2
    return sum(sizes[h + 1:]) / (t_end - stamps[h])


def synthetic(bs, device, num_classes, size):
    xb = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, num_classes, (bs,), device=device)
    while True: yield xb, yb


def endless(loader):
    while True: yield from loader


def versions(device) -> dict:
    v = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
             cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if device.type == 'cuda':
        v.update(device_name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)))
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', required=True, help='the Food-101 sample (holds food-101/images) or an ImageFolder tree')
    p.add_argument('--out', required=True, help='folder for <device>-<date>.json (rewritten after every measurement)')
    p.add_argument('--seconds', type=float, default=10, help='wall time per measurement')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    p.add_argument('--batch-size', type=int, default=256); p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=3); p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--epoch-images', type=int, default=200_000, help='length of the repeated training list')
    p.add_argument('--device', default='cuda'); p.add_argument('--compile', action='store_true')
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu")
    if device.type == 'cuda': torch.backends.cudnn.benchmark = True   # as train_epoch does
    samples, classes = sample_list(Path(a.src))
    train = (samples * -(-a.epoch_images // len(samples)))[:max(a.epoch_images, a.batch_size * (a.warmup + 8))]
    dtype, pin, resize = amp_dtype(device), device.type == 'cuda', round(a.image_size * 256 / 224)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    date = datetime.date.today().isoformat()
    path = Path(a.out) / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{date}.json"
    out = dict(device=name, date=date, complete=False, results={m: {} for m in a.models}, pipeline_only={}, train_epoch={},
               versions=versions(device),
               settings=dict(batch_size=a.batch_size, image_size=a.image_size, workers_all=a.workers, cpu_count=os.cpu_count(),
                             seconds=a.seconds, warmup=a.warmup, amp=str(dtype), channels_last=True, compile=a.compile,
                             prefetcher='threaded', images=len(samples), smoke=device.type != 'cuda'))
    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix('.tmp'); tmp.write_text(json.dumps(out, indent=1) + '\n'); tmp.replace(path)
    def record(where: dict, key, rate, label):
        where[key] = round(rate, 1); save()
        print(f"{label:40s} {rate:9.1f} images/s", flush=True)

    def cpu_batches(workers):
        return make_loader(ImageDataset(train, classes, build_train_transform(a.image_size)), a.batch_size, True, workers,
                           seed=0, pin_memory=pin, image_size=a.image_size)
    def gpu_batches(workers):
        pipe = GPUBatchPipeline(True, device, a.image_size, resize, generator=make_generator(0), channels_last=True)
        return DevicePrefetcher(make_byte_loader(ByteDataset(train, classes), a.batch_size, True, workers, seed=0, pin_memory=pin), pipe, threaded=True)

    save()
    # the pipeline alone: the prefetcher loop with no model (an upper bound for any backbone)
    for key, workers in (('all_workers', a.workers), ('2workers', 2)):
        loader = gpu_batches(workers)
        record(out['pipeline_only'], key, steady_rate(endless(loader), lambda xb, yb: None, device, a.seconds, a.warmup),
               f"pipeline only ({workers} workers)")
        del loader; gc.collect()
    steps = {m: make_train_step(m, len(classes), device, dtype, a.compile) for m in a.models}
    configs = {'ceiling': lambda: None, 'gpu_pipeline': lambda: gpu_batches(a.workers), 'cpu_pipeline': lambda: cpu_batches(a.workers),
               'gpu_pipeline_2workers': lambda: gpu_batches(2), 'cpu_pipeline_2workers': lambda: cpu_batches(2)}
    for cname, make in configs.items():
        loader = make()
        for m in a.models:
            src = synthetic(a.batch_size, device, len(classes), a.image_size) if loader is None else endless(loader)
            record(out['results'][m], cname, steady_rate(src, steps[m], device, a.seconds, a.warmup), f"{m} {cname}")
            del src; gc.collect()
        del loader; gc.collect()
    for m, r in out['results'].items():
        r['ratios'] = {'gpu_over_ceiling': r['gpu_pipeline'] / r['ceiling'], 'gpu_over_cpu': r['gpu_pipeline'] / r['cpu_pipeline'],
                       'gpu_2w_over_cpu_2w': r['gpu_pipeline_2workers'] / r['cpu_pipeline_2workers']}
        print(f"{m:16s} gpu/ceiling {r['ratios']['gpu_over_ceiling']:.2f}  gpu/cpu {r['ratios']['gpu_over_cpu']:.2f}  "
              f"gpu_2w/cpu_2w {r['ratios']['gpu_2w_over_cpu_2w']:.2f}")
    save()
    # the real training loop on the GPU pipeline, for the first backbone: what `nutrilearn-train` users get
    m = a.models[0]
    ceiling = out['results'][m]['ceiling']
    n_batches = max(8, int(min(out['results'][m]['gpu_pipeline'], ceiling) * a.seconds / a.batch_size))
    model = build_model(m, len(classes), pretrained=False).to(device, memory_format=torch.channels_last)
    if a.compile: model = torch.compile(model)
    opt, scaler = build_optimizer(model), (torch.amp.GradScaler('cuda') if dtype == torch.float16 else None)
    pipe = GPUBatchPipeline(True, device, a.image_size, resize, generator=make_generator(0), channels_last=True)
    pf = DevicePrefetcher(make_byte_loader(ByteDataset(train[:n_batches * a.batch_size], classes), a.batch_size, True, a.workers,
                                           seed=0, pin_memory=pin), pipe, threaded=True)
    def run(epoch):
        guard = StepGuard()
        train_epoch(model, pf, nn.CrossEntropyLoss(), opt, device, epoch, scaler=scaler, amp_dtype=dtype, guard=guard,
                    progress=False, channels_last=device.type == 'cuda')
        return guard.images / guard.seconds   # train_epoch ends with a host read of its sums: the GPU work is done
    run(1)   # warm-up epoch: worker start (they persist), cuDNN autotuning, compilation
    sync(device)
    out['train_epoch'] = dict(model=m, batches=n_batches, workers=a.workers)
    record(out['train_epoch'], 'images_per_s', run(2), f"{m} train_epoch (gpu pipeline, {a.workers} workers)")
    out['train_epoch']['over_ceiling'] = round(out['train_epoch']['images_per_s'] / ceiling, 3)
    out['complete'] = True; save()
    print(f"wrote {path}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
