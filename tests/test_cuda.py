"""Issue 12 item 5: the GPU checks, runnable with pytest alone on a bare CUDA machine (torch, torchvision, numpy,
Pillow, pytest, hypothesis; no mlflow: an in-memory tracker; no nbdev).

    PYTHONPATH=. python -m pytest -q tests/test_cuda.py        # from the repository root, food-101-mini beside it

What the `#| cuda` notebook cells check, plus the decode-race stress test: nvjpeg vs libjpeg-turbo, the GPU validation
path vs PIL, the prefetcher's bounds and channels-last layout (serial and threaded), mixed precision's dtype, two epochs
of mobilenet_v2 on the GPU pipeline with and without `--compile` and a resume, the `auto` fallback when the GPU
decoder is broken, and many batches through the threaded prefetcher compared image by image with CPU decodes
(pytorch/vision#9606). The check functions live in `tests/cuda_checks.py`; `tests/test_gpu_data.py` runs them on the
CPU. Without CUDA this whole module is skipped: it is for the GPU machine, not for CI.
"""
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/test_cuda.py is run on the GPU machine; the same checks run on the CPU in "
                "tests/test_gpu_data.py)", allow_module_level=True)

from cuda_checks import (MINI, check_prefetched_batches, decode_agreement, decode_race_stress, mini_files,
                         train_on_gpu_pipeline, val_vs_pil)
from nutrilearn_train import gpu_data
from nutrilearn_train.config import TrainingConfig
from nutrilearn_train.gpu_data import PROBE_TOLERANCE, get_gpu_data_loaders, probe_gpu_pipeline
from nutrilearn_train.train import amp_dtype_for, amp_settings, make_loaders

CUDA = torch.device('cuda', 0)


@pytest.fixture(scope='module', autouse=True)
def need_mini():
    if not (MINI / 'food-101/meta/train.json').is_file(): pytest.fail(f"the Food-101 sample is missing at {MINI}; set NUTRILEARN_MINI")


def test_nvjpeg_agrees_with_libjpeg():
    r = decode_agreement(mini_files(4), CUDA)
    print(f"nvjpeg vs libjpeg-turbo: {r}")
    assert r['same_shapes'] and r['mean'] < 2


def test_gpu_validation_matches_pil_within_the_probe_tolerance():
    r = val_vs_pil(mini_files(4), CUDA)
    print(f"GPU validation vs PIL: {r}")
    assert r['mean'] < 0.02 and r['mean'] <= PROBE_TOLERANCE['mean'] and r['max'] <= PROBE_TOLERANCE['max']
    assert probe_gpu_pipeline(mini_files(7), CUDA) is None


@pytest.mark.parametrize('threaded', [False, True])
def test_prefetcher_bounds_and_channels_last(threaded):
    tr, va, _, tp, vp = get_gpu_data_loaders(MINI, 64, 2, device=CUDA, max_per_class=20, channels_last=True)
    assert check_prefetched_batches(tr, tp, threaded) == len(tr) and check_prefetched_batches(va, vp, threaded) == len(va)
    torch.cuda.synchronize()


def test_mixed_precision_dtype_follows_the_capability():
    dt, scaler = amp_settings(CUDA, True)
    assert dt == amp_dtype_for(torch.cuda.get_device_capability(CUDA), torch.cuda.is_bf16_supported(including_emulation=False))
    assert (scaler is None) == (dt == torch.bfloat16)


@pytest.mark.parametrize('compile', [False, True])
def test_two_epochs_of_mobilenet_on_the_gpu_pipeline_and_a_resume(tmp_path, compile):
    r = train_on_gpu_pipeline(MINI, tmp_path, CUDA, compile)
    assert r['tags']['data_pipeline'] == 'gpu' and r['tags']['device'] == 'cuda'
    hist = r['first']['history']
    assert [h['epoch'] for h in hist] == [1, 2] and all(h['train_loss'] == h['train_loss'] and 0 <= h['val_acc'] <= 1 for h in hist)
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in r['checkpoint_keys'])
    assert r['resumed_run'] and [h['epoch'] for h in r['resumed']['history']] == [1, 2, 3]
    assert r['resumed']['history'][:2] == hist


def test_auto_falls_back_to_the_cpu_pipeline_when_the_gpu_decoder_is_broken(monkeypatch):
    def broken(x, device): raise RuntimeError('nvjpeg: NVJPEG_STATUS_NOT_INITIALIZED (simulated)')
    cfg = TrainingConfig(data_dir=str(MINI), batch_size=8, num_workers=0, max_per_class=2, device='cuda')
    tr, _, _ = make_loaders(cfg, CUDA)
    assert isinstance(tr, gpu_data.DevicePrefetcher) and tr.threaded           # healthy: the GPU pipeline
    monkeypatch.setattr(gpu_data, '_decode_jpeg', broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        tr, _, _ = make_loaders(cfg, CUDA)
    assert not isinstance(tr, gpu_data.DevicePrefetcher)
    assert any('the GPU data pipeline failed its start-up check: it raised RuntimeError' in str(m.message) for m in w)
    with pytest.raises(ValueError, match='--data-pipeline gpu: the GPU data pipeline failed its start-up check'):
        make_loaders(TrainingConfig(**{**cfg.__dict__, 'data_pipeline': 'gpu'}), CUDA)


def test_decode_race_stress():
    "Hundreds of batches decoded on the prefetcher's side stream, each image compared with a CPU decode of its bytes."
    bad = decode_race_stress(mini_files(), CUDA, batches=150, batch_size=64, workers=4)
    assert not bad, f"{len(bad)} images decoded wrongly, e.g. {bad[:5]}"
