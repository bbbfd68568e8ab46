"Property tests for `nutrilearn_train.train`: metrics per epoch, checkpoint round trips, artifacts, the plateau scheduler and early stopping."
import contextlib, io, json, math, random, tempfile, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from nutrilearn_train import data
from nutrilearn_train.config import TrainingConfig
from nutrilearn_train.tracking import InMemoryTracker
from nutrilearn_train.train import (EarlyStopping, build_optimizer, build_scheduler, fit, load_checkpoint, load_model_config,
                                    read_checkpoint, resolve_model_dir, save_checkpoint, save_model_artifacts, step_scheduler)

PROPS = settings(max_examples=100, deadline=None, derandomize=True)
METRICS = ('train_loss', 'train_acc', 'val_loss', 'val_acc')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Tiny tensors: a second torch thread only adds sync cost on a busy 2-core machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(n_in=12, n_out=3, hidden=0, seed=0):
    torch.manual_seed(seed)
    if not hidden: return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, n_out))


def loaders(n_train, n_val, bs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, 3, 2, 2, generator=g)
    ds = TensorDataset(x, x.sum((2, 3)).argmax(1))
    tr = torch.utils.data.Subset(ds, range(n_train)); va = torch.utils.data.Subset(ds, range(n_train, n_train + n_val))
    return data.make_loader(tr, bs, shuffle=True, seed=seed), data.make_loader(va, bs, seed=seed)


def cfg_in(d, **kw):
    base = dict(num_classes=3, epochs=3, learning_rate=0.01, checkpoint_dir=str(Path(d)/'ck'), output_dir=str(Path(d)/'out'),
                tracking_uri='sqlite:////unused/mlflow.db', keep_checkpoints=1)
    return TrainingConfig(**{**base, **kw})


def scripted(losses, snaps=None):
    "A `validate` seam returning `losses[epoch-1]` (accuracy 1/epoch) and snapshotting the weights it scores."
    seen = []
    def validate(model, loader, criterion, device, **kw):
        seen.append(1); e = len(seen)
        if snaps is not None: snaps[e] = {k: v.clone() for k, v in model.state_dict().items()}
        return losses[e - 1], 1 / e
    return validate


def quiet_fit(*a, **kw):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fit(*a, **kw)


# Property 3: every epoch's four metrics are logged, at step = epoch, as finite numbers (accuracies in [0, 1]).
@PROPS
@given(epochs=st.integers(1, 4), n_train=st.integers(2, 20), n_val=st.integers(1, 8), bs=st.integers(1, 8),
       accum=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_every_epoch_logs_the_four_metrics(epochs, n_train, n_val, bs, accum, seed):
    with tempfile.TemporaryDirectory() as d:
        t = InMemoryTracker(); t.start()
        res = quiet_fit(tiny_model(seed=seed), *loaders(n_train, n_val, bs, seed), cfg_in(d, epochs=epochs, grad_accum_steps=accum),
                        tracker=t, progress=False)
        for k in METRICS:
            assert [s for s, _ in t.metrics[k]] == list(range(1, epochs + 1)), (k, t.metrics[k])
            assert all(math.isfinite(v) for _, v in t.metrics[k])
        for k in ('train_acc', 'val_acc'): assert all(0 <= v <= 1 for _, v in t.metrics[k])
        assert [r['epoch'] for r in res['history']] == list(range(1, epochs + 1))
        assert read_checkpoint(Path(d)/'ck/last.pth')['epoch'] == epochs


def _state_equal(a, b):
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a): return isinstance(b, float) and math.isnan(b)
    return a == b


# Property 4: save -> load restores model, optimizer, scheduler, early stopping, epoch, best accuracy, RNG and plain values exactly.
@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step()` before `optimizer.step()`')
@PROPS
@given(n_in=st.integers(1, 6), n_out=st.integers(2, 5), hidden=st.sampled_from([0, 4]), opt=st.sampled_from(['adam', 'adamw', 'sgd']),
       steps=st.integers(0, 3), epoch=st.integers(0, 500), best=st.one_of(st.none(), st.floats(0, 1)),
       history=st.lists(st.dictionaries(st.sampled_from(METRICS), st.floats(allow_nan=False), max_size=4), max_size=4),
       run_id=st.one_of(st.none(), st.text(max_size=12)), sched=st.sampled_from(['plateau', 'cosine']),
       val_losses=st.lists(st.floats(0, 10), max_size=5), seed=st.integers(0, 2**31))
def test_checkpoint_round_trip_is_exact(n_in, n_out, hidden, opt, steps, epoch, best, history, run_id, sched, val_losses, seed):
    torch.manual_seed(seed)
    m = tiny_model(n_in * 4, n_out, hidden, seed)
    o = build_optimizer(m, opt, lr=0.01); s = build_scheduler(o, sched, epochs=5); es = EarlyStopping(3)
    for _ in range(steps):
        o.zero_grad(); m(torch.randn(3, n_in, 2, 2)).pow(2).mean().backward(); o.step()
    for e, l in enumerate(val_losses, 1): step_scheduler(s, l); es.step(l, e, l / 10)
    random.seed(seed); np.random.seed(seed % 2**32); np.random.randn()
    with tempfile.TemporaryDirectory() as d:
        p = save_checkpoint(m, o, epoch, best, Path(d)/'c.pth', scheduler=s, early_stopping=es, history=history, run_id=run_id)
        expected_draws = (random.random(), np.random.randn(), torch.rand(2))
        random.seed(seed + 1); np.random.seed((seed + 1) % 2**32); torch.manual_seed(seed + 1)
        m2 = tiny_model(n_in * 4, n_out, hidden, seed + 1); o2 = build_optimizer(m2, opt, lr=0.5)
        s2 = build_scheduler(o2, sched, epochs=9); es2 = EarlyStopping(7)
        assert load_checkpoint(p, m2, o2, scheduler=s2, early_stopping=es2) == (epoch + 1, best)
        draws = (random.random(), np.random.randn(), torch.rand(2))
        assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
        assert _state_equal(m.state_dict(), m2.state_dict())
        assert _state_equal(o.state_dict(), o2.state_dict())
        assert _state_equal(s.state_dict(), s2.state_dict())
        assert _state_equal(es.state_dict(), es2.state_dict())
        ck = read_checkpoint(p)
        assert _state_equal(ck['history'], history) and ck['run_id'] == run_id


names = st.text('abcdefghijklmnopqrstuvwxyz_', min_size=1, max_size=12)

# Property 5: the three artifact files exist, parse, agree with each other, and the weights load into a fresh model.
@PROPS
@given(classes=st.lists(names, min_size=2, max_size=8, unique=True), version=st.one_of(st.none(), st.integers(1, 50)),
       best=st.one_of(st.none(), st.floats(0, 1)), model_name=st.sampled_from(['mobilenet_v2', 'efficientnet_b0', 'resnet50']),
       earlier=st.integers(0, 2), seed=st.integers(0, 10**6))
def test_artifacts_exist_and_parse(classes, version, best, model_name, earlier, seed):
    rng = random.Random(seed); order = classes[:]; rng.shuffle(order)
    c2i = {c: i for i, c in enumerate(order)}
    m = tiny_model(12, len(classes), seed=seed)
    with tempfile.TemporaryDirectory() as d:
        for _ in range(earlier): save_model_artifacts(m, c2i, {'model_name': model_name}, output_dir=d)
        if version is not None and version <= earlier:
            with pytest.raises(FileExistsError, match='never overwritten'): save_model_artifacts(m, c2i, {}, version=version, output_dir=d)
            return
        vdir = save_model_artifacts(m, c2i, TrainingConfig(model_name=model_name, tracking_uri='sqlite:////x/m.db'), version=version,
                                    output_dir=d, best_accuracy=best, extra={'mlflow_run_id': 'r'})
        n = version or earlier + 1
        assert vdir == Path(d)/f'v{n}' and resolve_model_dir(d) == vdir
        assert sorted(p.name for p in vdir.iterdir()) == sorted(['class_to_idx.json', 'model_config.json', f'food_model_v{n}.pth'])
        assert json.loads((vdir/'class_to_idx.json').read_text()) == c2i
        mc = load_model_config(vdir)
        assert (mc['model_name'], mc['num_classes'], mc['version'], mc['weights_file'], mc['mlflow_run_id']) == \
               (model_name, len(classes), f'v{n}', f'food_model_v{n}.pth', 'r')
        assert mc['class_names'] == order and mc['best_accuracy'] == best and mc['input_size'] == [224, 224]
        assert len(mc['mean']) == len(mc['std']) == 3 and mc['training_config']['model_name'] == model_name
        fresh = tiny_model(12, len(classes), seed=seed + 1)
        fresh.load_state_dict(torch.load(vdir/mc['weights_file'], weights_only=True))
        assert _state_equal(fresh.state_dict(), m.state_dict())


def torch_plateau_lrs(losses, lr, factor, patience):
    "The LR each epoch would train with under torch's own ReduceLROnPlateau, stepped once per epoch with that epoch's loss."
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched, out = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode='min', factor=factor, patience=patience), []
    for l in losses: out.append(opt.param_groups[0]['lr']); sched.step(l)
    return out


def fit_lrs(losses, patience, factor, seed=0):
    "The learning rates `fit` logged, one per epoch, with a scripted validation loss."
    with tempfile.TemporaryDirectory() as d:
        t = InMemoryTracker(); t.start()
        cfg = cfg_in(d, epochs=len(losses), scheduler_patience=patience, scheduler_factor=factor, early_stopping_patience=0)
        quiet_fit(tiny_model(seed=seed), *loaders(4, 2, 4, seed), cfg, tracker=t, validate=scripted(losses), progress=False)
        return [v for _, v in t.metrics['learning_rate']]


# Property 9: the loop drives the plateau scheduler as torch defines it: stepped once per epoch on the validation loss, each
# epoch logged with the LR it trained with; so the LR only ever falls, by exactly the factor, and never while the loss improves.
@PROPS
@given(losses=st.lists(st.sampled_from([3.0, 2.0, 2.0, 2.0, 1.5, 1.0]), min_size=1, max_size=12),
       patience=st.sampled_from([3, 3, 1, 2]), factor=st.sampled_from([0.5, 0.5, 0.1]), seed=st.integers(0, 1000))
def test_plateau_lowers_the_learning_rate(losses, patience, factor, seed):
    got = fit_lrs(losses, patience, factor, seed)
    assert np.allclose(got, torch_plateau_lrs(losses, 0.01, factor, patience), rtol=1e-9), (losses, got)
    for e in range(1, len(got)):
        assert got[e] == got[e - 1] or np.isclose(got[e], got[e - 1] * factor), (losses, got)   # one factor at a time, never up
        if got[e] < got[e - 1]: assert e > patience and min(losses[e - patience - 1:e]) >= min(losses[:e - patience - 1] or [math.inf]), (losses, got)


def test_three_flat_epochs_halve_the_learning_rate():
    "The design's numbers, observed in the loop: patience 3, factor 0.5 -> after 3 flat epochs the next epoch trains at half the LR."
    assert fit_lrs([1.0] * 6, 3, 0.5) == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.01, 0.005])
    assert fit_lrs([3.0, 2.5, 2.0, 1.5, 1.0, 0.5], 3, 0.5) == pytest.approx([0.01] * 6)   # an improving loss never lowers it


# Property 10: with no val-loss improvement for `patience` epochs training stops at best_epoch + patience, and best.pth holds the best epoch's weights.
@PROPS
@given(losses=st.lists(st.floats(0.5, 3.0), min_size=1, max_size=12), patience=st.sampled_from([5, 5, 1, 2, 3]), seed=st.integers(0, 1000))
def test_early_stopping_stops_at_the_right_epoch_and_keeps_the_best(losses, patience, seed):
    best_e, stop = 0, None
    for e, l in enumerate(losses, 1):
        if best_e == 0 or l < losses[best_e - 1]: best_e = e
        elif e - best_e >= patience: stop = e; break
    with tempfile.TemporaryDirectory() as d:
        snaps = {}
        res = quiet_fit(tiny_model(seed=seed), *loaders(4, 2, 2, seed), cfg_in(d, epochs=len(losses), early_stopping_patience=patience, scheduler='none'),
                        validate=scripted(losses, snaps), progress=False)
        assert len(res['history']) == (stop or len(losses)) and res['stopped_early'] == (stop is not None)
        assert res['best_epoch'] == best_e and res['best_accuracy'] == 1 / best_e
        best = read_checkpoint(Path(d)/'ck/best.pth')
        assert best['epoch'] == best_e and _state_equal(best['model_state_dict'], snaps[best_e])


# Issue 23 item 2: a fused optimizer takes its skip decision on the device: no host read per step, with or without
# float16's GradScaler; the plain path (the negative control) reads at least once per step. A non-finite step is still skipped
# (with a scaler that is an overflow: the scale halves and the step is not counted as bad, as GradScaler does it).
@pytest.mark.parametrize('scaled', [False, True])
def test_a_fused_optimizer_step_never_reads_the_device(scaled):
    from cuda_checks import DeviceWork
    from nutrilearn_train.loop import _optimizer_step
    reads = {}
    for fused in (True, False):
        m = tiny_model(seed=1); opt = torch.optim.Adam(m.parameters(), lr=0.01, fused=fused)
        scaler = torch.amp.GradScaler('cpu', init_scale=256.) if scaled else None
        x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
        with DeviceWork('cpu') as w:
            for _ in range(5):
                loss = nn.functional.cross_entropy(m(x), y)
                (scaler.scale(loss) if scaled else loss).backward(); _optimizer_step(opt, scaler, 1.0)
        reads[fused] = w.n['host_reads']
        before = [p.detach().clone() for p in m.parameters()]
        loss = nn.functional.cross_entropy(m(x), y) * float('inf')
        (scaler.scale(loss) if scaled else loss).backward()
        assert bool(_optimizer_step(opt, scaler, 1.0)) == scaled                   # infinite gradients: skipped ...
        assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))    # ... the weights did not move
        if scaled: assert scaler.get_scale() == 128.                              # ... and the scale halved
    assert reads[True] == 0 and reads[False] >= 5, reads
