"""Issue 20 item 3: the fine-tuning recipe (`--freeze-epochs`, `--layer-decay`, `--ema-decay`, `--mixup`, `--cutmix`).

Properties (hypothesis, >= 100 examples each, on small CPU tensors): mixing keeps the label mass and the batch's pixel
sum, cuts only its box and draws boxes whose area is `1 - lam`; the training loss on mixed targets with label smoothing
equals timm's `mixup_target` composition; the dominant label is what the accuracy counts; layer-decay scales are the
BEiT rule; the EMA follows its definition; the freeze phase is a pure, monotone function of the epoch.
Integration: under torchrun semantics (two Gloo processes, DDP with `find_unused_parameters` as `prepare_model` builds
it) `fit` runs the whole recipe across the phase switch: both ranks finish with the same weights and EMA, and the
head-only epoch leaves the backbone untouched."""
import math, tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from nutrilearn_train.loop import (ModelEma, freeze_phase, layer_scales, mix_batch, mix_rng, sample_mix)

PROPS = settings(max_examples=100, deadline=None, derandomize=True)


@st.composite
def batches(draw):
    "A small image batch, its labels and class count."
    b, c, h, w = draw(st.integers(1, 6)), draw(st.integers(2, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g), c


@PROPS
@given(batch=batches(), mixup=st.floats(0, 4), cutmix=st.floats(0, 4), seed=st.integers(0, 10**6), epoch=st.integers(1, 100))
def test_mixing_keeps_label_mass_and_pixel_sums(batch, mixup, cutmix, seed, epoch):
    "Each image is mixed with its mirror: per image the targets sum to 1, per class and per pixel the batch keeps its totals."
    x, y, c = batch
    if mixup == 0 and cutmix == 0: mixup = 0.5
    mode, lam, box = sample_mix(mix_rng(seed, epoch), mixup, cutmix, *x.shape[-2:])
    xm, t = mix_batch(x, y, c, mode, lam, box)
    assert xm.shape == x.shape and t.shape == (len(y), c) and 0 <= lam <= 1
    assert torch.allclose(t.sum(1), torch.ones(len(y), dtype=t.dtype))
    assert torch.allclose(t.sum(0), F.one_hot(y, c).float().sum(0), atol=1e-5)     # flip(0) is a permutation
    assert torch.allclose(xm.sum(0), x.sum(0), atol=1e-9)                            # every pixel position keeps its batch sum
    if mode == 'cutmix':
        y0, y1, x0, x1 = box
        outside = torch.ones(x.shape[-2:], dtype=torch.bool); outside[y0:y1, x0:x1] = False
        assert torch.equal(xm[..., outside], x[..., outside])                         # only the box is pasted
        assert math.isclose(lam, 1 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1]))


@PROPS
@given(mixup=st.floats(0, 5), cutmix=st.floats(0, 5), h=st.integers(1, 300), w=st.integers(1, 300),
       seed=st.integers(0, 2**40), epoch=st.integers(1, 500), rank=st.integers(0, 7))
def test_draws_are_pure_and_in_bounds(mixup, cutmix, h, w, seed, epoch, rank):
    "A draw is a pure function of (seed, epoch, rank); boxes lie inside the image; only enabled modes are drawn."
    if mixup == 0 and cutmix == 0: cutmix = 1.0
    draw = lambda: [sample_mix(r, mixup, cutmix, h, w) for r in [mix_rng(seed, epoch, rank)] for _ in range(5)]
    a = draw()
    assert a == draw()
    for mode, lam, box in a:
        assert mode in (['mixup'] if cutmix == 0 else ['cutmix'] if mixup == 0 else ['mixup', 'cutmix'])
        assert 0 <= lam <= 1
        if box: y0, y1, x0, x1 = box; assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w


@PROPS
@given(c=st.integers(2, 20), b=st.integers(1, 8), lam=st.floats(0, 1), ls=st.floats(0, 0.9), seed=st.integers(0, 10**6))
def test_soft_targets_with_label_smoothing_equal_timms_mixup_target(c, b, lam, ls, seed):
    "CrossEntropyLoss(label_smoothing) on the mixed one-hot targets = the loss on timm's smoothed-then-mixed targets."
    g = torch.Generator().manual_seed(seed)
    out, y = torch.randn(b, c, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)
    _, soft = mix_batch(torch.zeros(b, 3, 1, 1), y, c, 'mixup', lam)
    off, on = ls / c, 1 - ls + ls / c                       # timm.data.mixup.one_hot / mixup_target
    smooth = lambda t: F.one_hot(t, c).double() * (on - off) + off
    timm = smooth(y) * lam + smooth(y.flip(0)) * (1 - lam)
    want = (-timm * out.log_softmax(1)).sum(1).mean()
    assert torch.isclose(F.cross_entropy(out, soft.double(), label_smoothing=ls), want, rtol=1e-6, atol=1e-6)   # the targets are float32


@PROPS
@given(c=st.integers(2, 10), b=st.integers(1, 8), lam=st.floats(0, 1).filter(lambda v: abs(v - 0.5) > 1e-9), seed=st.integers(0, 10**6))
def test_the_dominant_label_is_the_larger_share(c, b, lam, seed):
    "The accuracy under mixing counts the soft target's argmax: the image's own label when lam > 1/2, its mirror's otherwise."
    y = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))
    _, soft = mix_batch(torch.zeros(b, 3, 1, 1), y, c, 'mixup', lam)
    assert torch.equal(soft.argmax(1), y if lam > 0.5 else y.flip(0))


@PROPS
@given(n=st.integers(1, 40), d=st.floats(0.01, 1))
def test_layer_scales_follow_the_beit_rule(n, d):
    "Head 1, block i of n at d**(n - i), the outsiders as block 0; never larger nearer the input."
    s = layer_scales(n, d)
    assert len(s) == n + 2 and s[-1] == 1.0 and s[0] == s[1] == d ** n
    assert all(math.isclose(s[i + 1], d ** (n - i)) for i in range(n))
    assert all(a <= b for a, b in zip(s, s[1:]))


@PROPS
@given(decay=st.floats(0.01, 0.999), steps=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_ema_follows_its_definition(decay, steps, seed):
    "After each update: ema = decay * ema + (1 - decay) * w for every parameter; buffers equal the model's."
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema, expect = ModelEma(model, decay), [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters(): p.copy_(torch.randn(p.shape, generator=g))
            model.train()(torch.randn(5, 3, generator=g))   # moves the BatchNorm statistics
        ema.update(model)
        expect = [decay * e + (1 - decay) * p.detach() for e, p in zip(expect, model.parameters())]
    for e, p in zip(expect, ema.module.parameters()): assert torch.allclose(e, p, atol=1e-5)
    for a, b in zip(ema.module.buffers(), model.buffers()): assert torch.equal(a, b)


@PROPS
@given(n=st.integers(0, 20), k=st.integers(-1, 19), epochs=st.integers(1, 40))
def test_freeze_phase_is_head_only_then_the_configured_freeze(n, k, epochs):
    "Epochs 1..n freeze everything (-1), later ones use freeze_layers: one switch, never back."
    phases = [freeze_phase(e, n, k) for e in range(1, epochs + 1)]
    assert phases == [-1] * min(n, epochs) + [k] * max(epochs - n, 0)


# ---------------------------------------------------------------- two processes (Gloo), as under torchrun

def _recipe_rank(rank, init_file, out_dir):
    "One rank of a 2-process job: `fit` with the whole recipe on a short MobileNetV2 that `prepare_model` wrapped in DDP."
    from unittest import mock
    from torch.utils.data import TensorDataset
    from torchvision import models as tvm
    from nutrilearn_train import models
    from nutrilearn_train.config import TrainingConfig
    from nutrilearn_train.data import make_loader
    from nutrilearn_train.loop import DistInfo, fit
    from nutrilearn_train.persistence import read_checkpoint
    from nutrilearn_train.train import prepare_model
    tdist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        short = lambda name, n, pretrained=True, weights_path=None: tvm.MobileNetV2(num_classes=n, width_mult=0.25, inverted_residual_setting=[[1, 8, 1, 1], [2, 8, 2, 2]])
        g, y = torch.Generator().manual_seed(0), torch.arange(48) % 3
        x = torch.randn(48, 3, 8, 8, generator=g) + 2 * F.one_hot(y, 3).float()[:, :, None, None]
        shard = (rank, 2)
        loaders = (make_loader(TensorDataset(x[:32], y[:32]), 4, shuffle=True, seed=0, image_size=8, shard=shard),
                   make_loader(TensorDataset(x[32:], y[32:]), 4, seed=0, image_size=8, shard=shard))
        cfg = TrainingConfig(num_classes=3, epochs=2, freeze_epochs=1, freeze_layers=0, layer_decay=0.7, ema_decay=0.9, mixup=0.4,
                             cutmix=1.0, learning_rate=0.01, checkpoint_dir=str(Path(out_dir)/'ck'), output_dir=str(Path(out_dir)/'out'),
                             tracking_uri='sqlite:////unused/mlflow.db')
        dist = DistInfo(rank, 2, rank, active=True)
        with mock.patch.object(models, 'build_model', short): model = prepare_model(cfg, 3, torch.device('cpu'), dist)   # DDP as train() wraps it
        net = model.module; init = {k: v.clone() for k, v in net.state_dict().items()}
        fit(model, *loaders, cfg, progress=False, dist=dist)
        flat = lambda sd: torch.cat([v.double().flatten() for v in sd.values()])
        ema = read_checkpoint(Path(out_dir)/'ck/last.pth')['ema'] if rank == 0 else None
        both = [torch.zeros_like(flat(net.state_dict())) for _ in range(2)]; tdist.all_gather(both, flat(net.state_dict()))
        lines = [f"same weights {torch.equal(*both)}"]
        if rank == 0:
            e1 = read_checkpoint(Path(out_dir)/'ck/epoch_001.pth')['model_state_dict']
            lines += [f"backbone kept in epoch 1 {all(torch.equal(e1[k], init[k]) for k in init if k.startswith('features.'))}",
                      f"backbone moved in epoch 2 {not torch.equal(flat({k: v for k, v in net.state_dict().items() if k.startswith('features.0.')}), flat({k: v for k, v in e1.items() if k.startswith('features.0.')}))}",
                      f"ema differs {not torch.equal(flat(ema), flat(net.state_dict()))}"]
        Path(out_dir, f'rank{rank}').write_text('\n'.join(lines))
    finally: tdist.destroy_process_group()


def test_the_recipe_under_ddp_crosses_the_phase_switch(tmp_path):
    "Without find_unused_parameters DDP would fail at the second head-only step; with it both ranks train in step."
    import torch.multiprocessing as mp
    mp.start_processes(_recipe_rank, args=(str(tmp_path/'pg'), str(tmp_path)), nprocs=2, start_method='spawn', join=True)
    assert (tmp_path/'rank0').read_text().splitlines() == ['same weights True', 'backbone kept in epoch 1 True',
                                                          'backbone moved in epoch 2 True', 'ema differs True']
    assert (tmp_path/'rank1').read_text() == 'same weights True'
