"""Benchmark (not a test): images/s of `train.train_epoch` with tracking and progress bars on, against a minimal plain
PyTorch loop (same model, data, batch size and optimizer, no tracking, no bars), measured alternately in one process.

    python bench/train_loop.py                      # mobilenet_v2, 48 synthetic 160-px images, batch 16, InMemoryTracker
    python bench/train_loop.py --tracker sqlite     # a real MLflowTracker on a temporary sqlite store

Prints both rates and their ratio (target >= 0.95, i.e. at most 5 % overhead) by wall clock and by this process's CPU
time (the number other load on a shared machine cannot distort; use --threads 1 so it is not inflated by thread spinning):
the median over alternating pairs and best-vs-best."""
import argparse, copy, statistics, sys, tempfile, time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nutrilearn_train import tracking
from nutrilearn_train.models import build_model
from nutrilearn_train.train import train_epoch


def plain_epoch(model, loader, criterion, optimizer):
    "The baseline: the shortest correct training loop."
    model.train()
    for xb, yb in loader:
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()


def ours_epoch(model, loader, criterion, optimizer, tracker, epoch):
    "`train_epoch` (clipping, NaN/OOM guards, tqdm bar) plus the per-epoch tracker call `fit` makes."
    loss, acc = train_epoch(model, loader, criterion, optimizer, 'cpu', epoch, progress=True, log_interval=1)
    tracker.log_metrics(dict(train_loss=loss, train_acc=acc, val_loss=loss, val_acc=acc, learning_rate=1e-3, epoch_time=0.), step=epoch)


def timed(f) -> tuple:
    "`(wall seconds, CPU seconds of this process)` for `f()`; CPU time is what other load on a shared machine cannot inflate."
    w, c = time.perf_counter(), time.process_time(); f()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model-name', default='mobilenet_v2')
    p.add_argument('--n-images', type=int, default=48)
    p.add_argument('--image-size', type=int, default=160)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    p.add_argument('--tracker', choices=('memory', 'sqlite'), default='memory')
    a = p.parse_args(argv)

    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y = torch.randn(a.n_images, 3, a.image_size, a.image_size), torch.randint(0, 10, (a.n_images,))
    loader = DataLoader(TensorDataset(x, y), batch_size=a.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    base, crit = build_model(a.model_name, 10, pretrained=False), nn.CrossEntropyLoss()
    def fresh():
        "A copy of the same starting weights and a new optimizer: both loops always do identical work."
        m = copy.deepcopy(base); return m, torch.optim.Adam(m.parameters(), 1e-3)
    with tempfile.TemporaryDirectory() as d:
        tracker = (tracking.InMemoryTracker() if a.tracker == 'memory' else
                   tracking.MLflowTracker(f'sqlite:///{d}/mlflow.db', 'bench', journal_path=Path(d)/'journal.jsonl'))
        tracker.start()
        m, o = fresh(); plain_epoch(m, loader, crit, o); m, o = fresh(); ours_epoch(m, loader, crit, o, tracker, 0)  # warm-up
        plain, ours = [], []
        for r in range(1, a.repeats + 1):  # alternate, so drifting machine load hits both alike
            m, o = fresh(); plain.append(timed(lambda: plain_epoch(m, loader, crit, o)))
            m, o = fresh(); ours.append(timed(lambda: ours_epoch(m, loader, crit, o, tracker, r)))
        tracker.end()
    print(f"{a.model_name}, {a.n_images} images of {a.image_size}px, batch {a.batch_size}, {torch.get_num_threads()} threads, "
          f"tracker={a.tracker}, torch {torch.__version__}")
    for i, clock in enumerate(('wall', 'cpu')):
        p_ips, o_ips = [a.n_images / t[i] for t in plain], [a.n_images / t[i] for t in ours]
        ratios = [o / p for o, p in zip(o_ips, p_ips)]
        print(f"[{clock} clock] plain loop  : {' '.join(f'{v:.2f}' for v in p_ips)} img/s (median {statistics.median(p_ips):.2f})")
        print(f"[{clock} clock] train_epoch : {' '.join(f'{v:.2f}' for v in o_ips)} img/s (median {statistics.median(o_ips):.2f})")
        print(f"[{clock} clock] ratio train_epoch/plain: median of pairs {statistics.median(ratios):.3f}, "
              f"best vs best {max(o_ips)/max(p_ips):.3f} (target >= 0.95)")
    return 0


if __name__ == '__main__': sys.exit(main())
