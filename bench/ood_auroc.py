"""Issue 20 item 5: how well does the calibrated top probability tell food photos from photos that are not food?

For a trained model folder, the backend's own answers (`Predictor.from_dir`: the folder's temperature, threshold and
tta) on three groups of photos:
  food     the test split of the dataset the model was trained on (food-101-mini: 150 photos, known dishes)
  unknown  every photo of another food dataset (indian-dishes-mini: 360 photos of 6 dishes the model never saw)
  nonfood  photos that are not food (bench/nonfood: 36 photos with known sources and licences; fetch.sh collects them)
It prints the AUROC of the top probability for food vs non-food (a) and unknown food vs non-food (b), the share of
each group answered `uncertain`, and the same AUROCs at T = 1 (the model's own softmax) for comparison.

    bash bench/nonfood/fetch.sh /tmp/nonfood-photos
    python bench/ood_auroc.py --model-dir outputs/v1 --food-dir ../shared/data/food-101-mini \\
        --unknown-dir ../shared/data/indian-dishes-mini --nonfood-dir /tmp/nonfood-photos
"""
import argparse, time
from pathlib import Path

import numpy as np
import torch

from nutrilearn_train.data import find_dataset
from nutrilearn_train.inference import Predictor
from nutrilearn_train.metrics import auroc
from nutrilearn_train.predict import CALIBRATION_KEYS

PHOTO = {'.jpg', '.jpeg', '.png'}


def answers(pred:Predictor, paths:list, bs:int=32) -> list:
    "The top-1 answer dicts of `pred` for `paths`, in batches."
    return [a for i in range(0, len(paths), bs) for a in pred.answer_batch(paths[i:i + bs], top_k=1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model-dir', required=True)
    p.add_argument('--food-dir', required=True, help="the training data: its test split is the 'food' group")
    p.add_argument('--unknown-dir', required=True, help="another food dataset: all its photos are the 'unknown' group")
    p.add_argument('--nonfood-dir', required=True, help='a folder of photos that are not food (bench/nonfood/fetch.sh)')
    a = p.parse_args(argv)
    torch.manual_seed(0)
    served = Predictor.from_dir(a.model_dir, device='cpu')
    plain = Predictor(served.model, {k: v for k, v in served.config.items() if k not in CALIBRATION_KEYS}, tta=served.tta)
    food = find_dataset(a.food_dir)['test']
    unknown = [s for part in ('train', 'val', 'test') for s in (find_dataset(a.unknown_dir)[part] or [])]
    nonfood = sorted(q for q in Path(a.nonfood_dir).iterdir() if q.suffix.lower() in PHOTO)
    groups = dict(food=[q for q, _ in food], unknown=[q for q, _ in unknown], nonfood=nonfood)
    print(f"model {served.config['model_name']} {served.config['version']} from {a.model_dir}: temperature {served.config.get('temperature')}, "
          f"uncertainty_threshold {served.config.get('uncertainty_threshold')}, tta {served.tta}")
    t0, top = time.perf_counter(), {}
    for name, pr in (('served', served), ('T=1', plain)):
        res = {g: answers(pr, paths) for g, paths in groups.items()}
        top[name] = {g: np.array([r['predictions'][0][1] for r in rs]) for g, rs in res.items()}
        if name == 'served':
            acc = np.mean([r['predictions'][0][0] == c for r, (_, c) in zip(res['food'], food)])
            print(f"food test top-1 {acc:.1%} ({len(food)} photos)")
            for g, rs in res.items():
                print(f"  {g:8} {len(rs):4} photos: uncertain {np.mean([r['uncertain'] for r in rs]):6.1%}, median top probability {np.median(top[name][g]):.3f}")
    for name, t in top.items():
        print(f"AUROC ({name}): (a) food vs non-food {auroc(t['food'], t['nonfood']):.3f}; (b) unknown food vs non-food "
              f"{auroc(t['unknown'], t['nonfood']):.3f}; (food vs unknown food {auroc(t['food'], t['unknown']):.3f})")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == '__main__': main()
