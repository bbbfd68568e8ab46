"""CPU inference latency of mobilenet_v2 (random weights, 101 classes, 224 px): eager PyTorch, TorchScript, ONNX Runtime
and int8 (ONNX Runtime static QDQ), single image and batch 32, in one process with ratios to eager.

Not a test. Run: `python bench/inference.py [--runs 30] [--threads N]`. Variants are timed round-robin (one call of
each per round) so load from other processes hits all of them alike; the table shows medians.
"""
import os
# Before torch loads OpenMP: on shared 2-core machines spin-waiting OpenMP threads make eager PyTorch 5-100x slower
# (measured 319 ms vs 25 ms per image), which would flatter every other row. Passive waiting gives eager a fair baseline.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import argparse, statistics, sys, tempfile, time, warnings
from pathlib import Path

import numpy as np
import torch

from nutrilearn_train.data import IMAGENET_MEAN, IMAGENET_STD
from nutrilearn_train.inference import calibration_images, export_int8, export_onnx, export_torchscript, load_exported
from nutrilearn_train.models import build_model

DATA = Path(__file__).resolve().parents[1].parent/'shared/data/food-101-mini'


def ort_session(path, threads:int, tuned:bool):
    "An ONNX Runtime session: library defaults, or tuned (all graph optimisations, fixed threads, no spin-waiting)."
    import onnxruntime as ort
    so = ort.SessionOptions()
    if tuned:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')  # idle threads sleep: kinder to shared cores
    s = ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'])
    return lambda x: s.run(None, {'input': x.numpy()})[0]


def build_variants(d:Path, threads:int) -> dict:
    torch.manual_seed(0)
    model = build_model('mobilenet_v2', 101, pretrained=False).eval()
    cfg = dict(model_name='mobilenet_v2', num_classes=101, class_names=[f'c{i}' for i in range(101)], input_size=224,
               resize_size=256, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), version=0)
    ts = export_torchscript(model, cfg, d/'m.torchscript.pt')
    onnx = export_onnx(model, cfg, d/'m.onnx')
    if DATA.is_dir(): calib = calibration_images(DATA, 32)
    else:  # no real photos here: calibrate on noise images (ranges less realistic, timings unaffected)
        from PIL import Image
        rng = np.random.default_rng(0)
        calib = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(16)]
    q = export_int8(model, cfg, d/'m.int8.onnx', calib)
    print(f"exports: TorchScript max|Δ|={ts.max_abs_diff:.1e}, ONNX max|Δ|={onnx.max_abs_diff:.1e}, "
          f"int8 {q.size_bytes/1e6:.1f} MB vs fp32 {q.baseline_size_bytes/1e6:.1f} MB, top-1 kept on {q.top1_agreement:.0%} of {len(calib)} calibration photos")
    cl_model = build_model('mobilenet_v2', 101, pretrained=False).eval().to(memory_format=torch.channels_last)
    cl_model.load_state_dict(model.state_dict())
    run_ts, _ = load_exported(ts.path)

    def eager(x):
        with torch.inference_mode(): return model(x)
    def eager_cl(x):
        with torch.inference_mode(): return cl_model(x.contiguous(memory_format=torch.channels_last))
    def torchscript(x):
        with torch.inference_mode(): return run_ts(x)
    return {'eager PyTorch (fp32)': eager,
            'eager + channels_last': eager_cl,
            'TorchScript (trace+freeze)': torchscript,
            'ONNX Runtime (default options)': ort_session(onnx.path, threads, tuned=False),
            'ONNX Runtime (tuned)': ort_session(onnx.path, threads, tuned=True),
            'int8 ONNX Runtime QDQ (tuned)': ort_session(q.path, threads, tuned=True)}


def time_round_robin(variants:dict, x:torch.Tensor, runs:int, warmup:int=3) -> dict:
    "Median milliseconds per call of each variant on `x`."
    for f in variants.values():
        for _ in range(warmup): f(x)
    times = {k: [] for k in variants}
    for _ in range(runs):
        for k, f in variants.items():
            t = time.perf_counter(); f(x); times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=30, help='timed rounds for single images (batch 32: a third of it)')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='intra-op threads for PyTorch and ONNX Runtime')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter('ignore')
    with tempfile.TemporaryDirectory() as d:
        variants = build_variants(Path(d), a.threads)
        g = torch.Generator().manual_seed(0)
        single = time_round_robin(variants, torch.randn(1, 3, 224, 224, generator=g), a.runs)
        batch = time_round_robin(variants, torch.randn(32, 3, 224, 224, generator=g), max(3, a.runs // 3), warmup=1)
    base_1, base_32 = single['eager PyTorch (fp32)'], batch['eager PyTorch (fp32)']
    print(f"\nmobilenet_v2, 224 px, CPU ({os.cpu_count()} cores, {a.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; medians of {a.runs} (single) / {max(3, a.runs // 3)} (batch) rounds\n")
    print('| variant | 1 image ms | × eager | batch 32 ms | × eager | batch 32 img/s |')
    print('|---|---:|---:|---:|---:|---:|')
    for k in variants:
        print(f"| {k} | {single[k]:.1f} | {single[k] / base_1:.2f} | {batch[k]:.0f} | {batch[k] / base_32:.2f} | {32e3 / batch[k]:.0f} |")
    ort_ratio = single['ONNX Runtime (tuned)'] / base_1
    print(f"\ntarget ONNX Runtime single-image latency <= 0.5 x eager: {ort_ratio:.2f} x -> {'met' if ort_ratio <= 0.5 else 'NOT met'}")
    return 0


if __name__ == '__main__': sys.exit(main())
