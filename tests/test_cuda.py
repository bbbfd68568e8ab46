"""The GPU checks (issues 12 and 23), runnable with pytest alone on a bare CUDA machine (torch, torchvision, numpy,
Pillow, pytest; no mlflow: an in-memory tracker; no nbdev, no scipy). `bench/gpu_check.sh` runs them, then the benchmark:

    PYTHONPATH=. python -m pytest -q tests/test_cuda.py        # from the repository root, food-101-mini beside it

nvjpeg vs libjpeg-turbo, the GPU validation path vs PIL, the prefetcher's bounds and channels-last layout (serial and
threaded), mixed precision's dtype, two epochs of mobilenet_v2 on the GPU pipeline with and without `--compile` and a
resume, the `auto` fallback when the GPU decoder is broken; and for issue 23: the decode-race stress test (many batches
through the threaded prefetcher compared image by image with CPU decodes, pytorch/vision#9606) with its negative
control (the unsynchronised decoder must be caught), no host synchronisation in the harness or in a pipeline batch,
the fast pipeline equal to the plain composition of its steps on CUDA, RGB-stored/CMYK/rotated/damaged JPEGs given the
CPU pipeline's verdict, and the training augmentation's distribution against the CPU pipeline's. The check functions
live in `tests/cuda_checks.py`; `tests/test_gpu_data.py` runs them on the CPU (there the checks are shown to pass and to
fail when they should). Without CUDA this module is collected (so its imports are checked) and skipped.
"""
import warnings

import pytest
import torch

# imported before the skip, so that collecting this file on a CPU (CI) proves it imports on a bare machine
from cuda_checks import (MINI, DecodeOnly, augmentation_gap, check_prefetched_batches, decode_agreement, decode_parity,
                         decode_race_stress, host_sync_error, mini_files, special_jpegs, train_on_gpu_pipeline,
                         unsynchronised_decode, val_vs_pil)
from nutrilearn_train import gpu_data
from nutrilearn_train.config import TrainingConfig, make_generator
from nutrilearn_train.data import AugmentSpec
from nutrilearn_train.gpu_data import (GPUBatchPipeline, PROBE_TOLERANCE, collate_bytes, color_jitter_batch, crop_resize, flip_batch,
                                       get_gpu_data_loaders, normalize_batch, pad_images, probe_gpu_pipeline, read_image_bytes)
from nutrilearn_train.train import amp_dtype_for, amp_settings, make_loaders

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/test_cuda.py is run on the GPU machine by bench/gpu_check.sh; the same checks run "
                "on the CPU in tests/test_gpu_data.py)", allow_module_level=True)

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
    assert [h['epoch'] for h in hist] == [1, 2] and all(h['train_loss'] == h['train_loss'] and 0 <= h['val_accuracy'] <= 1 for h in hist)
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


def test_decode_race_stress_catches_the_unsynchronised_decoder():
    "Negative control: the same stress test with `decode_jpeg` used as torchvision documents it (no wait for the work queued on the stream) finds wrong images."
    bad = decode_race_stress(mini_files(), CUDA, batches=60, batch_size=64, workers=4, decode=unsynchronised_decode)
    assert bad, ("the stress test found no wrong image with the unsynchronised decoder: either it cannot provoke the race "
                 "any more, or this torchvision fixed pytorch/vision#9606 (then gpu_data._decode_jpeg's wait can go)")


def test_the_race_harness_and_a_pipeline_batch_never_wait_for_the_gpu():
    "No host synchronisation besides the decoder's own wait: in the stress test's pipeline (else it could not fail) and in a training or validation batch (else the pipeline thread stalls); the check itself catches a plain copy."
    files = mini_files(10)[:32]
    bb = collate_bytes([(read_image_bytes(f), i, str(f)) for i, f in enumerate(files)])
    pipes = [DecodeOnly(CUDA)] + [GPUBatchPipeline(t, CUDA, generator=make_generator(0), channels_last=True) for t in (True, False)]
    with torch.cuda.stream(torch.cuda.Stream(CUDA)):
        for pipe in pipes:
            pipe(bb)   # warm-up: lazy initialisation (cuBLAS, nvjpeg) may synchronise once
            assert host_sync_error(pipe, bb) is None, pipe
    assert 'synchroniz' in (host_sync_error(lambda: torch.ones(3).to(CUDA)) or '')


def test_the_fast_training_batch_equals_the_plain_composition_on_cuda():
    "The grouped, packed pipeline on CUDA returns what the public steps return on the same draws (real photos, 224 px)."
    files = mini_files(20)
    pipe = GPUBatchPipeline(True, CUDA, generator=make_generator(3))
    items = [read_image_bytes(f) for f in files]
    xb, _ = pipe(items, None, [str(f) for f in files])
    ims, _ = gpu_data.decode_items(items, [str(f) for f in files], CUDA)
    p = pipe.last_params
    ref = normalize_batch(color_jitter_batch(flip_batch(crop_resize(pad_images(ims), p['boxes']), p['flip']), p['factors'], p['order']))
    torch.testing.assert_close(xb, ref, atol=2e-3, rtol=0)


def test_special_and_damaged_jpegs_get_the_cpu_pipelines_verdict(tmp_path):
    "RGB-stored (Adobe transform 0, or R/G/B ids), CMYK, rotated, progressive, restart-marker and damaged JPEGs through the GPU path: skipped exactly when PIL rejects them, intact ones within the probe tolerance of PIL, none left to PIL silently."
    corpus = special_jpegs(tmp_path, mini_files()[0])
    assert decode_parity(corpus, CUDA) == []


def test_gpu_training_augmentation_draws_the_cpu_distribution():
    "Per photo, 128 training augmentations by the GPU pipeline on CUDA and by PIL: the same distribution of channel means and spreads, colourfulness, luminance centroid and structure (every Fisher-combined KS p >= 1e-4); with the jitter off on the GPU the check fails."
    files = mini_files(75)
    gap = augmentation_gap(files, CUDA, draws=128, image_size=224)
    assert min(gap.values()) >= 1e-4, gap
    spec = AugmentSpec()
    off = lambda s: GPUBatchPipeline(True, CUDA, generator=make_generator(s), scale=spec.scale, ratio=spec.ratio, flip_p=spec.flip_p, jitter=(0., 0., 0.))
    assert min(augmentation_gap(files, CUDA, draws=64, image_size=224, pipeline=off).values()) < 1e-6
