"""Benchmark (not a test): training images/s through the real `train_epoch`, with the CPU (PIL) and the GPU (nvjpeg) data
pipelines, eager and compiled, for the three backbones, on one GPU. `bench/gpu_check.sh` runs it after the GPU tests.

    PYTHONPATH=. python3 bench/gpu_throughput.py --src ../shared/data/food-101-mini --out bench/results --budget-s 300
    PYTHONPATH=. python3 bench/gpu_throughput.py --src ../shared/data/food-101-mini --out /tmp/b --smoke   # CPU: runs every
                                                                    # path that needs no GPU; its numbers mean nothing

Needs only torch, torchvision, numpy and Pillow (no mlflow, nbdev, tqdm). `--src` is the Food-101 sample
(`food-101/images/<class>/*.jpg`); the long training list repeats its files in memory, so the workers never restart.
Everything is set as a Colab user's run sets it: mixed precision from `train.amp_settings` (bf16 autocast where the GPU
computes it natively, else fp16 with a GradScaler), channels-last, `train.build_optimizer` (Adam), cudnn.benchmark (by
`train_epoch`), the GPU pipeline with its start-up probe and strict decoding, exactly as `train.make_loaders` builds it.
"All usable cores" is `len(os.sched_getaffinity(0))` (the CPUs this process may run on, not `os.cpu_count()`).

Measurements (images/s; each a warm-up epoch, then a timed one of about `--seconds`):
  pipeline_only   {gpu,cpu}_{all,2w}: the loader (and for GPU the threaded DevicePrefetcher) alone, no model
  results[model][eager|compile]
    ceiling       `train_epoch` on synthetic batches already on the device: the model and the loop alone
    gpu_all       `train_epoch` on the GPU pipeline, all usable cores as workers (what `nutrilearn-train` does)
    gpu_2w, cpu_all, cpu_2w   mobilenet_v2 only: the GPU pipeline with 2 workers (a Colab VM), the CPU pipeline
  gpu_pipeline    the probe's verdict, strict decoding, how many images each measurement decoded where (device,
                  the workers' CPU, PIL after a device failure, skipped), and so which pipeline was really measured
  targets         issue 23's targets with the measured values; skipped: measurements the time budget left out
The JSON (`--out/<device>-<date>.json`) is rewritten after every measurement, so a run cut short keeps what it measured;
`--budget-s` bounds the whole run: a measurement that would not fit is skipped and listed, compiles last.
"""
import argparse, datetime, gc, itertools, json, os, platform, re, sys, time
from collections import Counter
from pathlib import Path

import torch
import torchvision
from torch import nn

from nutrilearn_train.config import make_generator
from nutrilearn_train.data import ImageDataset, build_train_transform, food101_samples, folder_samples, make_loader
from nutrilearn_train.gpu_data import ByteDataset, DevicePrefetcher, GPUBatchPipeline, make_byte_loader, probe_gpu_pipeline
from nutrilearn_train.models import build_model
from nutrilearn_train.train import StepGuard, amp_settings, build_optimizer, train_epoch

MODELS = ('mobilenet_v2', 'efficientnet_b0', 'resnet50')
TARGETS = (   # (name, numerator, denominator or None, threshold): issue 23, on one H100
    ('mobilenet_v2 compiled train_epoch >= 6,000 images/s', ('mobilenet_v2', 'compile', 'gpu_all'), None, 6000),
    ('mobilenet_v2 eager train_epoch >= 4,500 images/s', ('mobilenet_v2', 'eager', 'gpu_all'), None, 4500),
    ('mobilenet_v2 compiled >= 3.3x the all-core CPU pipeline', ('mobilenet_v2', 'compile', 'gpu_all'), ('mobilenet_v2', 'eager', 'cpu_all'), 3.3),
    ('2 workers: GPU pipeline >= 10x the CPU pipeline', ('mobilenet_v2', 'eager', 'gpu_2w'), ('mobilenet_v2', 'eager', 'cpu_2w'), 10),
    *((f'{m} {mode} >= 85 % of its model-alone ceiling', (m, mode, 'gpu_all'), (m, mode, 'ceiling'), 0.85)
      for m in ('resnet50', 'efficientnet_b0') for mode in ('eager', 'compile')))


def usable_cpus() -> int:
    "The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def sample_list(src: Path) -> tuple:
    "`(samples, classes)`: `(path, label)` pairs of the Food-101 sample (or an ImageFolder tree) under `src`."
    src = Path(src)
    base = src / 'food-101' if (src / 'food-101/meta/train.json').is_file() else src
    pairs = (food101_samples(base, 'train') + food101_samples(base, 'test')) if (base / 'meta/train.json').is_file() else folder_samples(src)
    if not pairs: raise SystemExit(f"no images under {src}: pass --src pointing at food-101-mini (holding food-101/images)")
    classes = sorted({c for _, c in pairs})
    return [(p, classes.index(c)) for p, c in pairs], classes


class Take:
    "The next `n` items of the iterator `it`, as a sized loader: the workers and prefetch thread behind `it` keep running between uses."
    def __init__(self, it, n: int): self.it, self.n = it, n
    def __len__(self): return self.n
    def __iter__(self): return (next(self.it) for _ in range(self.n))


def endless(loader):
    while True: yield from loader


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def versions(device) -> dict:
    v = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
             cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if device.type == 'cuda':
        v.update(device_name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)))
    return v


class Bench:
    "The measurements of one run, its JSON file and its time budget."
    def __init__(self, a, device):
        self.a, self.device, self.t0 = a, device, time.monotonic()
        self.samples, self.classes = sample_list(Path(a.src))
        n = max(a.epoch_images, a.batch_size * 64)
        self.train = (self.samples * -(-n // len(self.samples)))[:n]
        self.amp_dtype, self.scaler_on = amp_settings(device, True)[0], amp_settings(device, True)[1] is not None
        self.cl, self.resize = device.type == 'cuda', round(a.image_size * 256 / 224)
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
        date = datetime.date.today().isoformat()
        self.path = Path(a.out) / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{date}.json"
        self.loaders, self.compile_s = {}, None
        self.out = dict(device=name, date=date, complete=False, smoke=a.smoke, gpu_tests=a.tests, versions=versions(device),
                        settings=dict(batch_size=a.batch_size, image_size=a.image_size, workers_all=a.workers, cpus_usable=usable_cpus(),
                                      cpu_count=os.cpu_count(), seconds=a.seconds, budget_s=a.budget_s, amp=str(self.amp_dtype),
                                      grad_scaler=self.scaler_on, channels_last=self.cl, compile_backend=a.compile_backend,
                                      images=len(self.samples), models=list(a.models)),
                        gpu_pipeline=dict(strict_decode=True), pipeline_only={}, results={m: {'eager': {}, 'compile': {}} for m in a.models},
                        decoded_by_measurement={}, skipped=[], targets=[])

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix('.tmp'); tmp.write_text(json.dumps(self.out, indent=1) + '\n'); tmp.replace(self.path)

    def left(self) -> float: return self.a.budget_s - (time.monotonic() - self.t0)

    def fits(self, what: str, cost_s: float) -> bool:
        "True if `cost_s` more seconds fit the budget; else `what` is listed as skipped."
        if self.left() >= cost_s: return True
        self.out['skipped'].append(f"{what}: needs ~{cost_s:.0f} s, {max(self.left(), 0):.0f} s of the budget left"); self.save()
        print(f"{what:44s}   skipped (time budget)", flush=True); return False

    def record(self, where: dict, key: str, rate: float, label: str):
        where[key] = round(rate, 1); self.save()
        print(f"{label:44s} {rate:9.1f} images/s   ({self.left():.0f} s of the budget left)", flush=True)

    # ---------------------------------------------------------------- loaders, one alive at a time
    def loader(self, kind: str, workers: int):
        "An endless iterator of training batches from the `kind` ('gpu' or 'cpu') pipeline with `workers` workers."
        key = (kind, workers)
        if key not in self.loaders:
            self.close_loaders()
            a, pin = self.a, self.device.type == 'cuda'
            if kind == 'cpu':
                dl = make_loader(ImageDataset(self.train, self.classes, build_train_transform(a.image_size)), a.batch_size, True, workers,
                                 seed=0, pin_memory=pin, image_size=a.image_size)
                pipe = None
            else:   # as train.make_loaders builds it: strict decoding, channels-last, the threaded prefetcher
                pipe = GPUBatchPipeline(True, self.device, a.image_size, self.resize, generator=make_generator(0), channels_last=self.cl,
                                        strict_decode=True)
                dl = DevicePrefetcher(make_byte_loader(ByteDataset(self.train, self.classes), a.batch_size, True, workers, seed=0), pipe, threaded=True)
            self.loaders[key] = (endless(dl), pipe, dl)
        return self.loaders[key]

    def close_loaders(self):
        for it, _, _ in self.loaders.values(): it.close()
        self.loaders.clear(); gc.collect()

    def decoded(self, pipe, before: Counter, label: str):
        if pipe is not None: self.out['decoded_by_measurement'][label] = dict(pipe.decoded - before)

    # ---------------------------------------------------------------- measurements
    def pipeline_only(self, kind: str, workers: int, tag: str):
        label = f"pipeline only: {kind}, {workers} workers"
        if not self.fits(label, 3 * self.a.seconds + 10): return
        it, pipe, _ = self.loader(kind, workers)
        before = Counter(pipe.decoded) if pipe is not None else None
        for _ in range(self.a.warmup): next(it)
        sync(self.device); n, t = 0, time.perf_counter()
        while time.perf_counter() - t < self.a.seconds or n < 2 * self.a.batch_size:
            xb, yb = next(it); n += len(yb)
        sync(self.device)
        self.decoded(pipe, before, label)
        self.record(self.out['pipeline_only'], f"{kind}_{tag}", n / (time.perf_counter() - t), label)

    def model(self, name: str, compiled: bool):
        "A fresh backbone, optimizer and scaler as `train` sets them up (compiled with `--compile-backend` if asked)."
        m = build_model(name, len(self.classes), pretrained=False)
        m = m.to(self.device, memory_format=torch.channels_last) if self.cl else m.to(self.device)
        fwd = torch.compile(m, backend=self.a.compile_backend) if compiled else m
        return fwd, build_optimizer(fwd), amp_settings(self.device, True)[1]

    def epoch(self, model, opt, scaler, batches) -> float:
        "Images/s of one real `train_epoch` over `batches` (it ends with a host read of its sums: the device work is done)."
        guard = StepGuard()
        train_epoch(model, batches, nn.CrossEntropyLoss(), opt, self.device, 1, scaler=scaler, amp_dtype=self.amp_dtype, guard=guard,
                    progress=False, channels_last=self.cl)
        return guard.images / guard.seconds

    def timed(self, model, opt, scaler, it) -> float:
        "A warm-up epoch (compilation, cuDNN autotuning, the prefetch queue filling), then one of about `--seconds`."
        warm = self.epoch(model, opt, scaler, Take(it, self.a.warmup))
        return self.epoch(model, opt, scaler, Take(it, max(4, int(warm * self.a.seconds / self.a.batch_size))))

    def train_epoch_rate(self, m: str, mode: str, source: str, workers: int = 0, tag: str = '', model=None):
        label = f"{m} {mode}: {source}" + (f", {workers} workers" if workers else '')
        cost = 3 * self.a.seconds + 15 + (0 if model is not None or mode == 'eager' else self.compile_estimate())
        if not self.fits(label, cost): return model
        t = time.monotonic()
        model = model or self.model(m, mode == 'compile')
        key = source if source == 'ceiling' else f"{source}_{tag}"
        if source == 'ceiling':
            xb = torch.randn(self.a.batch_size, 3, self.a.image_size, self.a.image_size, device=self.device)
            xb = xb.contiguous(memory_format=torch.channels_last) if self.cl else xb
            rate = self.timed(*model, itertools.repeat((xb, torch.randint(0, len(self.classes), (self.a.batch_size,), device=self.device))))
        else:
            it, pipe, _ = self.loader(source, workers)
            before = Counter(pipe.decoded) if pipe is not None else None
            rate = self.timed(*model, it)
            self.decoded(pipe, before, label)
        if mode == 'compile' and self.compile_s is None: self.compile_s = time.monotonic() - t   # the first compile prices the rest
        self.record(self.out['results'][m][mode], key, rate, label)
        return model

    def compile_estimate(self) -> float: return 1.5 * self.compile_s if self.compile_s is not None else 120.

    # ---------------------------------------------------------------- the run
    def probe(self) -> bool:
        "The start-up check `auto` runs before trusting the GPU pipeline; False (and the reason recorded) if it fails."
        why = probe_gpu_pipeline([p for p, _ in self.samples], self.device)
        self.out['gpu_pipeline']['probe'] = why or 'passed'; self.save()
        print(f"GPU pipeline start-up check: {why or 'passed'}", flush=True)
        return why is None

    def run(self):
        a, first = self.a, self.a.models[0]
        self.save()
        gpu_ok = self.probe()
        if not gpu_ok: self.out['skipped'].append("every GPU-pipeline measurement: the start-up check failed")
        for kind, workers, tag in (('gpu', a.workers, 'all'), ('gpu', 2, '2w'), ('cpu', a.workers, 'all'), ('cpu', 2, '2w')):
            if kind == 'cpu' or gpu_ok:
                self.pipeline_only(kind, workers, tag)
                if (kind, tag) == ('gpu', 'all'):
                    for m in a.models: self.train_epoch_rate(m, 'eager', 'gpu', workers, tag)
                elif first == 'mobilenet_v2': self.train_epoch_rate(first, 'eager', kind, workers, tag)
        self.close_loaders()
        for m in a.models: self.train_epoch_rate(m, 'eager', 'ceiling')
        for m in a.models:   # compiles last: the most expensive, and the first to go when time runs out
            model = self.train_epoch_rate(m, 'compile', 'ceiling')
            if gpu_ok: self.train_epoch_rate(m, 'compile', 'gpu', a.workers, 'all', model=model)
            del model; gc.collect()
        self.close_loaders()
        self.summarise(); self.out['complete'] = True; self.save()
        print(f"wrote {self.path}")

    def summarise(self):
        "Which pipeline was measured, the targets, and a table."
        d = sum((Counter(v) for k, v in self.out['decoded_by_measurement'].items()), Counter())
        g = self.out['gpu_pipeline']; g['decoded'] = dict(d)
        total = sum(d.values())
        g['measured'] = ('not measured' if not total else f"{self.device.type} decoder: {100 * d['device'] / total:.1f} % of the images, "
                         f"the workers' CPU {100 * d['cpu'] / total:.1f} %, PIL after a device failure {100 * d['pil'] / total:.1f} %, skipped {d['skipped']}")
        res = self.out['results']
        get = lambda k: res.get(k[0], {}).get(k[1], {}).get(k[2])
        for name, num, den, thr in TARGETS:
            v = get(num) if den is None else (get(num) / get(den) if get(num) and get(den) else None)
            self.out['targets'].append(dict(target=name, value=None if v is None else round(v, 3), threshold=thr,
                                            met=None if v is None or self.a.smoke else bool(v >= thr)))
        print(f"\n{self.out['device']}, batch {self.a.batch_size}, {self.a.image_size} px, amp {self.out['settings']['amp']}, "
              f"{self.a.workers} usable cores" + ('   (SMOKE RUN: the numbers mean nothing)' if self.a.smoke else ''))
        print(f"GPU pipeline: probe {g.get('probe')}, strict decoding; measured: {g['measured']}")
        if self.a.tests: print(f"GPU tests: {self.a.tests}")
        cols = ('ceiling', 'gpu_all', 'gpu_2w', 'cpu_all', 'cpu_2w')
        print(f"{'images/s':26s}" + ''.join(f"{c:>10s}" for c in cols))
        for m, modes in res.items():
            for mode, r in modes.items():
                if r: print(f"{m + ' ' + mode:26s}" + ''.join(f"{r[c]:10.0f}" if c in r else f"{'-':>10s}" for c in cols))
        po = self.out['pipeline_only']
        print("pipeline only: " + ', '.join(f"{k} {v:.0f}" for k, v in po.items()))
        for t in self.out['targets']:
            verdict = 'smoke run' if self.a.smoke else 'not measured' if t['met'] is None else 'met' if t['met'] else 'MISSED'
            print(f"  target {t['target']:58s} {'-' if t['value'] is None else t['value']:>10}  {verdict}")
        for s in self.out['skipped']: print(f"  skipped: {s}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', required=True, help='the Food-101 sample (holds food-101/images) or an ImageFolder tree')
    p.add_argument('--out', required=True, help='folder for <device>-<date>.json (rewritten after every measurement)')
    p.add_argument('--seconds', type=float, help='length of each timed epoch (default 4; smoke 0.2)')
    p.add_argument('--budget-s', type=float, default=330, help='wall-time budget of the whole run (measurements that would not fit are skipped)')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    p.add_argument('--batch-size', type=int, help='default 256; smoke 4'); p.add_argument('--image-size', type=int, help='default 224; smoke 32')
    p.add_argument('--warmup', type=int, help='batches of the warm-up epoch before each timed one (default 5; smoke 1)')
    p.add_argument('--workers', type=int, help='"all usable cores": default len(os.sched_getaffinity(0)); smoke 1')
    p.add_argument('--epoch-images', type=int, help='length of the repeated training list (default 200,000; smoke 400)')
    p.add_argument('--device', help='default cuda; smoke cpu'); p.add_argument('--compile-backend', help='default inductor; smoke eager')
    p.add_argument('--tests', default=None, help="the GPU tests' outcome, recorded in the JSON (gpu_check.sh passes it)")
    p.add_argument('--smoke', action='store_true', help='CPU, tiny sizes, a fraction of a second per measurement, compile with the eager backend')
    a = p.parse_args(argv)
    defaults = dict(seconds=0.2, batch_size=4, image_size=32, warmup=1, workers=1, epoch_images=400, device='cpu', compile_backend='eager') if a.smoke \
        else dict(seconds=4, batch_size=256, image_size=224, warmup=5, workers=usable_cpus(), epoch_images=200_000, device='cuda', compile_backend='inductor')
    for k, v in defaults.items():
        if getattr(a, k) is None: setattr(a, k, v)
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("no CUDA device: run on a GPU machine, or pass --smoke")
    Bench(a, device).run()
    return 0


if __name__ == '__main__':
    sys.exit(main())
