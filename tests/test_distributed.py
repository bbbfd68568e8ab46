"""Issue 6: training under `torchrun` (DistributedDataParallel, Gloo on the CPU).

Unit: the samplers' coverage for 1-4 simulated ranks, the sum-based metric reduction (simulated ranks, and a real
one-rank Gloo group). Integration: `torchrun --nproc_per_node=2 -m nutrilearn_train.train` as a user runs it, on a
train/val tree of food-101-mini JPEGs (20 train, 11 val: an odd count, so a padding validation sampler would count an
image twice and be caught): one MLflow run with world_size=2, val accuracy equal to a single-process evaluation of the saved
weights, the checkpoint reloads in one process, a fresh run refuses to overwrite it (naming the failing ranks), and
the job resumes under torchrun and in a single process (a different world size)."""
import math, os, subprocess, sys, tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from hypothesis import given, settings, strategies as st
from torch.utils.data import TensorDataset

from conftest import free_port
from nutrilearn_train import data
from nutrilearn_train.data import ShardSampler
from nutrilearn_train.train import DistInfo, all_reduce_sums, teardown_distributed

PROPS = settings(max_examples=100, deadline=None, derandomize=True)
MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300  # seconds for one job; each takes ~15-25 s on 2 cores


def index_loaders(n, bs, seed, dist):
    "This rank's train/val loaders, built once with their samplers as `data.make_loader` does under torchrun; labels = indices."
    ds, shard = TensorDataset(torch.zeros(n, 1), torch.arange(n)), (dist.rank, dist.world_size)
    return data.make_loader(ds, bs, shuffle=True, seed=seed, shard=shard), data.make_loader(ds, bs, shard=shard)


def labels_seen(dl) -> list: return [int(y) for _, yb in dl for y in yb]


# Validation: every index exactly once across ranks, whatever the sizes (no padding), in shards differing by <= 1.
@PROPS
@given(n=st.integers(0, 300), ws=st.integers(1, 4), bs=st.integers(1, 9))
def test_val_shards_cover_every_index_exactly_once(n, ws, bs):
    ds = range(n)
    shards = [list(ShardSampler(ds, r, ws)) for r in range(ws)]
    assert sorted(sum(shards, [])) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1 and [len(ShardSampler(ds, r, ws)) for r in range(ws)] == list(map(len, shards))
    if n:   # through the loaders the trainer uses
        vals = [labels_seen(index_loaders(n, bs, 0, DistInfo(r, ws, r, True))[1]) for r in range(ws)]
        assert sorted(sum(vals, [])) == list(range(n))


# Train: equal shards (so the ranks' gradient all-reduces stay in step), an order that is a pure function of (seed, epoch),
# and every index exactly once per epoch when the size divides by the world size. Otherwise DistributedSampler pads with
# the first indices of that epoch's order: every index at least once, ws * ceil(n / ws) - n extra slots, each index at
# most twice (more only with fewer images than ranks). A ragged last batch is dropped (`data.ragged_last_batch`:
# kept only when it is the only one, and never a single image), on every rank alike.
@PROPS
@given(n=st.integers(1, 200), ws=st.integers(1, 4), bs=st.integers(1, 8), seed=st.integers(0, 10**6), epoch=st.integers(1, 50))
def test_train_shards_cover_every_index_once_per_epoch(n, ws, bs, seed, epoch):
    def epoch_shards():
        loaders = [index_loaders(n, bs, seed, DistInfo(r, ws, r, True))[0] for r in range(ws)]
        for dl in loaders: data.set_loader_epoch(dl, epoch)
        return loaders, [labels_seen(dl) for dl in loaders]
    loaders, shards = epoch_shards()
    per_rank = math.ceil(n / ws)
    dropped = per_rank % bs if data.ragged_last_batch(per_rank, bs) else 0
    assert [len(s) for s in shards] == [per_rank - dropped] * ws and len({len(dl) for dl in loaders}) == 1
    assert all(len(yb) == bs for dl in loaders for _, yb in dl) or per_rank < bs   # no ragged training batch
    assert epoch_shards()[1] == shards                      # reproducible: a resumed run sees the same order
    counts = Counter(sum(shards, []))
    if not dropped:
        assert set(counts) == set(range(n))
        if n % ws == 0: assert all(c == 1 for c in counts.values())
        else: assert sum(c - 1 for c in counts.values()) == ws * per_rank - n and max(counts.values()) == (2 if n >= ws else math.ceil(ws / n))
    if ws == 1 and not dropped: assert sorted(shards[0]) == list(range(n))


# The metric reduction: per-rank sums of loss*n, correct and n, summed over the ranks, give the whole-set mean loss and
# accuracy whatever the shard sizes (empty shards included) - what a single process computes over all images.
@PROPS
@given(losses=st.lists(st.floats(0, 20), min_size=1, max_size=60), data_=st.data(), ws=st.integers(1, 4))
def test_sum_reduction_equals_the_whole_set_metrics(losses, data_, ws):
    correct = data_.draw(st.lists(st.booleans(), min_size=len(losses), max_size=len(losses)))
    per_rank = [[sum(losses[i] for i in ShardSampler(losses, r, ws)), sum(correct[i] for i in ShardSampler(losses, r, ws)),
                 len(ShardSampler(losses, r, ws))] for r in range(ws)]
    total = [sum(col) for col in zip(*per_rank)]            # what all_reduce(SUM) computes across ranks
    assert total[2] == len(losses) and total[1] / total[2] == sum(correct) / len(correct)
    assert math.isclose(total[0] / total[2], sum(losses) / len(losses), rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope='module')
def gloo_group():
    "A real one-rank Gloo process group (what torchrun gives a single process)."
    with tempfile.TemporaryDirectory() as d:
        tdist.init_process_group('gloo', init_method=f'file://{d}/pg', rank=0, world_size=1, timeout=timedelta(seconds=60))
        try: yield DistInfo(0, 1, 0, active=True)
        finally: teardown_distributed()


@PROPS
@given(values=st.lists(st.one_of(st.integers(0, 10**9), st.floats(-1e6, 1e6)), min_size=1, max_size=5))
def test_all_reduce_sums_through_a_real_gloo_group(gloo_group, values):
    assert all_reduce_sums(values, gloo_group) == [float(v) for v in values]
    assert all_reduce_sums(values, None) == all_reduce_sums(values, DistInfo()) == [float(v) for v in values]


def test_ddp_accumulation_matches_one_big_batch(gloo_group):
    "Under DDP, accumulating (gradients all-reduced only at the window's last batch) equals one big batch, and the reduced metrics match."
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from nutrilearn_train.train import train_epoch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 12, generator=g); ds = TensorDataset(x, x[:, :3].argmax(1))
    def run(model, bs, accum, dist):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = train_epoch(model, torch.utils.data.DataLoader(ds, batch_size=bs), nn.CrossEntropyLoss(), opt, 'cpu', 1,
                        grad_accum_steps=accum, grad_clip_norm=0., progress=False, dist=dist)
        return m, torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.manual_seed(0); plain = run(nn.Linear(12, 3), 16, 1, None)
    torch.manual_seed(0); ddp = run(DistributedDataParallel(nn.Linear(12, 3)), 4, 4, gloo_group)
    assert torch.allclose(plain[1], ddp[1], atol=1e-6) and math.isclose(plain[0][0], ddp[0][0], rel_tol=1e-6) and plain[0][1] == ddp[0][1]


# ---------------------------------------------------------------- torchrun, as a user runs it

def _nan_on_rank_1(rank, init_file, out_dir):
    "One rank of a 2-process Gloo job: rank 1's loss is NaN, rank 0's is finite."
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel
    from nutrilearn_train.train import _forward_backward, _optimizer_step
    tdist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        lin = nn.Linear(4, 2)
        class Net(nn.Module):
            def __init__(self): super().__init__(); self.lin = lin
            def forward(self, x): return self.lin(x) * (float('nan') if rank == 1 else 1.)
        model = DistributedDataParallel(Net()); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        bad = _forward_backward(model, torch.randn(4, 4), torch.tensor([0, 1, 0, 1]), nn.CrossEntropyLoss(), 1., 4, None, None)[2]
        stepped = bool(_optimizer_step(opt, None, 0., bad, DistInfo(rank, 2, 0, active=True)))
        moved = not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        Path(out_dir, f'rank{rank}').write_text(f"{'stepped' if stepped else 'skipped'} {'moved' if moved else 'unchanged'}")
    finally: tdist.destroy_process_group()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    "Every rank runs backward (so none waits alone in DDP's gradient all-reduce) and all agree to skip the step."
    import torch.multiprocessing as mp
    mp.start_processes(_nan_on_rank_1, args=(str(tmp_path / 'pg'), str(tmp_path)), nprocs=2, start_method='spawn', join=True)
    assert [(tmp_path / f'rank{r}').read_text() for r in (0, 1)] == ['skipped unchanged', 'skipped unchanged']


def _empty_batch_on_rank_1(rank, init_file, out_dir):
    "One rank of a 2-process Gloo job through `train_epoch`: rank 1's second batch is empty (all its images were unreadable)."
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel
    from nutrilearn_train.train import train_epoch
    tdist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0); model = DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
        g = torch.Generator().manual_seed(rank)
        batch = lambda n: (torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g))
        loader = [batch(4), batch(0) if rank == 1 else batch(4), batch(4)]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        from nutrilearn_train.loop import StepGuard
        guard = StepGuard(); train_epoch(model, loader, nn.CrossEntropyLoss(), opt, 'cpu', 1, progress=False, guard=guard,
                                         dist=DistInfo(rank, 2, rank, active=True))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        both = [torch.zeros_like(flat) for _ in range(2)]; tdist.all_gather(both, flat)
        Path(out_dir, f'rank{rank}').write_text(f"{int(guard.images)} {'same' if torch.equal(*both) else 'different'}")
    finally: tdist.destroy_process_group()


def test_an_empty_batch_on_one_rank_does_not_hang_the_others(tmp_path):
    "The rank with the empty batch joins the step with a zero-weight stand-in: both finish, equal weights, only real images counted."
    import torch.multiprocessing as mp
    mp.start_processes(_empty_batch_on_rank_1, args=(str(tmp_path / 'pg'), str(tmp_path)), nprocs=2, start_method='spawn', join=True)
    assert [(tmp_path / f'rank{r}').read_text() for r in (0, 1)] == ['20 same', '20 same']   # 12 + 8 real images, all-reduced


def odd_tree(root:Path) -> Path:
    "train/<class>/ 2 images and val/<class>/ 1 image per class (2 for the first): 20 + 11 food-101-mini JPEGs, symlinked."
    imgs = MINI/'food-101/images'
    for i, c in enumerate(sorted(p.name for p in imgs.iterdir())):
        files = sorted((imgs/c).glob('*.jpg'))
        for part, chosen in (('train', files[:2]), ('val', files[2:4] if i == 0 else files[2:3])):
            (root/part/c).mkdir(parents=True)
            for f in chosen: (root/part/c/f.name).symlink_to(f)
    return root


def job_args(d:Path, epochs:int, *extra) -> list:
    return ['--data-dir', str(d/'data'), '--model-name', 'mobilenet_v2', '--no-pretrained', '--num-workers', '0',
            '--batch-size', '4', '--device', 'cpu', '--epochs', str(epochs), '--seed', '7', '--checkpoint-dir', str(d/'ck'),
            '--output-dir', str(d/'out'), '--tracking-uri', f'sqlite:///{d}/mlflow.db', '--experiment-name', 'ddp',
            '--registered-model-name', 'ddp', *extra]


def run(cmd:list, cwd:Path, ok:bool=True) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE', 'GLOO_SOCKET_IFNAME': 'lo',
           'NUTRILEARN_DIST_TIMEOUT': '120'}   # a hung collective fails the job well inside RUN_TIMEOUT
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if ok: assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def torchrun(d:Path, epochs:int, *extra, ok:bool=True) -> subprocess.CompletedProcess:
    return run([str(BIN/'torchrun'), '--nproc_per_node=2', '--nnodes=1', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{free_port()}',
                '--local-addr=127.0.0.1', '-m', 'nutrilearn_train.train', *job_args(d, epochs, *extra)], d, ok)


def printed_run_id(stdout:str) -> str: return stdout.split('MLflow run id: ')[1].split()[0]


def test_torchrun_two_processes_end_to_end(tmp_path):
    if not MINI.is_dir(): pytest.skip(f"the food-101-mini sample is missing at {MINI}")
    from mlflow import MlflowClient
    from nutrilearn_train import models
    from nutrilearn_train.train import build_optimizer, load_checkpoint, read_checkpoint, validate_epoch
    odd_tree(tmp_path/'data')

    r = torchrun(tmp_path, 1)
    run_id = printed_run_id(r.stdout)
    assert r.stdout.count('MLflow run id: ') == 1 and r.stdout.count('epoch 1/1  train loss') == 1   # rank 0 alone prints
    client = MlflowClient(f'sqlite:///{tmp_path}/mlflow.db')
    runs = client.search_runs([client.get_experiment_by_name('ddp').experiment_id])
    assert [x.info.run_id for x in runs] == [run_id] and runs[0].info.status == 'FINISHED'   # one job, one run
    # rank 1 reports to a NullTracker: it must not journal a pending run that rank 0 would replay as a second, empty RUNNING run
    assert not (tmp_path/'ck'/'mlflow_journal.jsonl').exists() and 'nutrilearn.pending_run_id' not in runs[0].data.tags
    assert runs[0].data.params['world_size'] == '2' and runs[0].data.params['batch_size'] == '4'
    val_acc, val_loss = runs[0].data.metrics['val_acc'], runs[0].data.metrics['val_loss']

    # the saved weights (epoch 1 = best = last), evaluated in this single process on the same validation split
    ck = read_checkpoint(tmp_path/'ck/last.pth')
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ck['model_state_dict'])
    torch.manual_seed(0)
    model = models.build_model('mobilenet_v2', 10, pretrained=False)
    models.freeze_layers(model, ck['config']['freeze_layers'])   # the job's recipe: the optimizer holds the same parameters
    opt = build_optimizer(model)
    assert load_checkpoint(tmp_path/'ck/last.pth', model, opt)[0] == 2              # reloads in one process, optimizer included
    weights = torch.load(tmp_path/'out/v1/food_model_v1.pth', weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in ck['model_state_dict'].items())
    train_dl, val_dl, _ = data.get_data_loaders(tmp_path/'data', 4, 0, seed=7)
    assert (len(train_dl.dataset), len(val_dl.dataset), runs[0].data.params['n_val']) == (20, 11, '11')
    loss, acc = validate_epoch(model, val_dl, torch.nn.CrossEntropyLoss(), 'cpu')
    assert acc == val_acc, (acc, val_acc)                                       # every val image counted once
    assert math.isclose(loss, val_loss, rel_tol=1e-4), (loss, val_loss)

    # a fresh job in the same checkpoint folder fails fast on every rank, naming it, and leaves last.pth alone
    before = (tmp_path/'ck/last.pth').read_bytes()
    r = torchrun(tmp_path, 1, ok=False)
    assert r.returncode != 0
    for rank in (0, 1): assert f'rank {rank} failed: error: the checkpoint folder' in r.stderr, r.stderr[-3000:]
    assert '--resume last' in r.stderr and (tmp_path/'ck/last.pth').read_bytes() == before

    # resume the 2-process job under torchrun: same run, epoch 2 appended
    r = torchrun(tmp_path, 2, '--resume', 'last')
    assert printed_run_id(r.stdout) == run_id and 'epoch 2/2' in r.stdout and 'epoch 1/2' not in r.stdout
    # and continue it in a single process (a different world size)
    r = run([str(BIN/'nutrilearn-train'), *job_args(tmp_path, 3, '--resume', 'last')], tmp_path)
    assert printed_run_id(r.stdout) == run_id and 'epoch 3/3' in r.stdout
    runs = client.search_runs([client.get_experiment_by_name('ddp').experiment_id])
    assert [(x.info.run_id, x.info.status) for x in runs] == [(run_id, 'FINISHED')]   # still one run after two resumes
    for k in ('train_loss', 'train_acc', 'val_loss', 'val_acc'):
        assert sorted(m.step for m in client.get_metric_history(run_id, k)) == [1, 2, 3], k
    assert read_checkpoint(tmp_path/'ck/last.pth')['epoch'] == 3
