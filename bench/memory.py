"""Benchmark (not a test): peak training memory and step time with and without `--grad-checkpointing`
(`models.enable_grad_checkpointing`) for the three backbones, as ratios against the plain model.

    PYTHONPATH=. python3 bench/memory.py                       # CPU, batch 16, 224 px, all three backbones
    PYTHONPATH=. python3 bench/memory.py --device cuda --batch-size 64
    PYTHONPATH=. python3 bench/memory.py --models mobilenet_v2 --batch-size 8 --steps 2

CPU: each (backbone, checkpointing) variant runs in a fresh child process; what one training step (forward, backward,
optimizer step) adds to the process's peak resident memory (ru_maxrss) is its peak training memory beyond the model
and the batch, the same quantity for both variants. CUDA: in one process, `torch.cuda.max_memory_allocated` during
a step after `reset_peak_memory_stats`, plain first. Time: the median of `--steps` steps after a warm-up step.
Imports only torch/torchvision and `nutrilearn_train.models`, so it runs on a bare GPU machine.
"""
import argparse, json, resource, statistics, subprocess, sys, time

CHILD = r'''
import json, resource, statistics, sys, time, torch
from torch import nn
from nutrilearn_train.models import build_model, enable_grad_checkpointing
name, ckpt, bs, size, steps, device = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
model = build_model(name, 101, pretrained=False).to(device).train()
if ckpt: enable_grad_checkpointing(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
x, y = torch.randn(bs, 3, size, size, device=device), torch.randint(0, 101, (bs,), device=device)
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
def step():
    loss = nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); sync()
if device == 'cuda':
    step(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); peak = (torch.cuda.max_memory_allocated() - base) / 2**20
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(); peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
times = []
for _ in range(steps):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps(dict(peak_mib=peak, step_s=statistics.median(times))))
'''


def run(name, ckpt, a) -> dict:
    r = subprocess.run([sys.executable, '-c', CHILD, name, '1' if ckpt else '0', str(a.batch_size), str(a.size), str(a.steps), a.device],
                       capture_output=True, text=True)
    if r.returncode: sys.exit(f"{name} (checkpointing={ckpt}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['mobilenet_v2', 'efficientnet_b0', 'resnet50'])
    p.add_argument('--batch-size', type=int, default=16); p.add_argument('--size', type=int, default=224)
    p.add_argument('--steps', type=int, default=3, help='timed steps after the warm-up/measured one')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    a = p.parse_args(argv)
    print(f"device {a.device}, batch {a.batch_size}, {a.size} px; peak = training memory beyond model and batch "
          f"({'max_memory_allocated' if a.device == 'cuda' else 'ru_maxrss increase'})")
    print(f"{'backbone':16} {'plain MiB':>10} {'ckpt MiB':>10} {'mem ratio':>10} {'plain s':>8} {'ckpt s':>8} {'time ratio':>10}")
    rows = []
    for name in a.models:
        plain, ck = run(name, False, a), run(name, True, a)
        rows.append(dict(model=name, plain=plain, ckpt=ck, mem_ratio=ck['peak_mib'] / plain['peak_mib'], time_ratio=ck['step_s'] / plain['step_s']))
        print(f"{name:16} {plain['peak_mib']:10.0f} {ck['peak_mib']:10.0f} {rows[-1]['mem_ratio']:10.2f} "
              f"{plain['step_s']:8.2f} {ck['step_s']:8.2f} {rows[-1]['time_ratio']:10.2f}", flush=True)
    print(json.dumps(rows))


if __name__ == '__main__': main()
