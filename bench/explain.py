"""Issue 14 figures on CPU: the time to explain one image (Grad-CAM, mobilenet_v2, 224 px) with our 20-line implementation
and, when `grad-cam` is installed, with its `GradCAM` on the same model, layer and class (and how far the two maps differ);
then mining throughput (images/s, batch 32, entropy) over every photo of food-101-mini.

Not a test. Run: `python bench/explain.py [--model-dir outputs] [--runs 20] [--threads N]`. Without `--model-dir` an
untrained mobilenet_v2 (101 classes) is used: the timings do not depend on the weights.
"""
import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # spinning OpenMP threads distort CPU timings on shared machines
import argparse, statistics, tempfile, time
from pathlib import Path

import numpy as np
import torch

from nutrilearn_train.data import load_image
from nutrilearn_train.explain import cam_layer, grad_cam
from nutrilearn_train.inference import Predictor
from nutrilearn_train.mining import list_images, score_images
from nutrilearn_train.models import build_model
from nutrilearn_train.persistence import save_model_artifacts

DATA = Path(__file__).resolve().parents[1].parent/'shared/data/food-101-mini'


def timed(fn, runs:int) -> float:
    "Median milliseconds of `fn()` over `runs` calls after one warm-up call."
    fn(); ts = []
    for _ in range(runs):
        t0 = time.perf_counter(); fn(); ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model-dir', default=None); ap.add_argument('--data-dir', default=str(DATA))
    ap.add_argument('--runs', type=int, default=20); ap.add_argument('--threads', type=int, default=None)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory()
    if a.model_dir is None:
        torch.manual_seed(0)
        save_model_artifacts(build_model('mobilenet_v2', 101, pretrained=False), {f'c{i:03d}': i for i in range(101)},
                             {'model_name': 'mobilenet_v2'}, output_dir=tmp.name)
    pred = Predictor.from_dir(a.model_dir or tmp.name, 'cpu')
    photos = list_images(Path(a.data_dir))
    photo = photos[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {pred!r}; photo {photo.name}")
    ms_pred = timed(lambda: pred.predict(photo), a.runs)
    ms_explain = timed(lambda: pred.explain(photo), a.runs)
    print(f"predict one image: {ms_pred:.1f} ms; explain one image (Grad-CAM, preprocessing included): {ms_explain:.1f} ms (median of {a.runs})")
    x = pred.transform(load_image(photo)).unsqueeze(0)
    ours = grad_cam(pred.model, x)[0]
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        import importlib.metadata as md
        cls = int(pred.model(x).argmax())
        with GradCAM(model=pred.model, target_layers=[cam_layer(pred.model)]) as gc:
            theirs = gc(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
            ms_lib = timed(lambda: gc(input_tensor=x, targets=[ClassifierOutputTarget(cls)]), a.runs)
        ms_ours = timed(lambda: grad_cam(pred.model, x), a.runs)
        d = np.abs(ours - theirs)
        print(f"grad-cam {md.version('grad-cam')} GradCAM on the same tensor: {ms_lib:.1f} ms vs ours {ms_ours:.1f} ms; "
              f"max |Δ| {d.max():.2e}, mean |Δ| {d.mean():.2e}, correlation {np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]:.6f}")
    except ImportError: print("grad-cam is not installed: no comparison (pip install grad-cam)")
    t0 = time.perf_counter()
    rows, skipped = score_images(pred, photos, 'entropy', batch_size=32)
    secs = time.perf_counter() - t0
    print(f"mining: {len(rows)} images scored in {secs:.1f} s = {len(rows) / secs:.1f} images/s (batch 32, decoding included), {len(skipped)} skipped")


if __name__ == '__main__': main()
