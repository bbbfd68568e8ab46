"""Follow `cfg` from `nutrilearn-train` to the registry: which modules it passes through, in call order.

    PYTHONPATH=. python bench/cfg_path.py [--data-dir ../shared/data/food-101-mini]

Runs a tiny real training (1 epoch, 2 images per class, head only, a throw-away sqlite store) under a profiler that
records every call of a package function that receives the run's `TrainingConfig`; prints the module sequence (repeats
folded) and, per module, how many times the path comes back into it after leaving it (issue 19's count)."""
import argparse, sys, tempfile
from collections import Counter
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
ap.add_argument('--data-dir', default=str(Path(__file__).resolve().parents[2]/'shared/data/food-101-mini'))
a = ap.parse_args()

from nutrilearn_train.config import TrainingConfig
from nutrilearn_train.train import main

calls = []
def prof(frame, event, arg):
    if event != 'call': return
    mod = frame.f_globals.get('__name__', '')
    if not mod.startswith('nutrilearn_train.') or frame.f_code.co_name.startswith('<'): return
    if any(isinstance(v, TrainingConfig) for v in frame.f_locals.values()):
        calls.append((mod.split('.', 1)[1], frame.f_code.co_name))

with tempfile.TemporaryDirectory() as d:
    argv = ['--data-dir', a.data_dir, '--no-pretrained', '--epochs', '1', '--max-per-class', '2', '--batch-size', '4', '--num-workers', '0',
            '--freeze-layers', '-1', '--device', 'cpu', '--checkpoint-dir', f'{d}/ck', '--output-dir', f'{d}/out',
            '--tracking-uri', f'sqlite:///{d}/mlflow.db', '--promote', 'always']
    sys.setprofile(prof)
    try: rc = main(argv)
    finally: sys.setprofile(None)
assert rc == 0, rc
path = [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]
mods = [m for i, (m, _) in enumerate(path) if i == 0 or m != path[i - 1][0]]
print('call path of cfg (module.function):')
for m, f in path: print(f'  {m}.{f}')
print('\nmodule sequence:', ' -> '.join(mods))
back = Counter(m for i, m in enumerate(mods) if m in mods[:i])
print('returns into a module after leaving it:', dict(back) or 'none', f'(total {sum(back.values())})')
print('returns into train:', back.get('train', 0))
