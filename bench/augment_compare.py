"""Benchmark (not a test): our batched GPU augmentation vs kornia.augmentation, speed and fidelity to PIL.

    python bench/augment_compare.py [--device cuda] [--batch-size 256]     # needs `pip install kornia` for the kornia rows

Both get the same decoded Food-101 images. kornia's `RandomResizedCrop` takes one same-size tensor, so the speed
rows use the 512x512 images only (63 % of Food-101; the others would need a resize or padding that changes the crop
distribution); ours also runs on the mixed-size batch. Fidelity: for the same crop boxes, the output of our
`roi_align` crop and of kornia's `crop_and_resize` is compared with PIL's `resized_crop` (the CPU pipeline).
On a CPU the speed numbers say nothing about a GPU.
"""
import argparse, sys, time
from pathlib import Path

import torch
from torchvision.transforms import functional as TF
from torchvision.transforms.functional import pil_to_tensor

from nutrilearn_train.config import make_generator
from nutrilearn_train.gpu_data import (color_jitter_batch, crop_resize, decode_items, flip_batch, normalize_batch,
                                       pad_images, read_image_bytes, sample_crop_boxes, sample_train_params)

MINI = Path(__file__).resolve().parents[1].parent / 'shared/data/food-101-mini'


def timed(f, device, n=10):
    f()
    if device.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): f()
    if device.type == 'cuda': torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def ours(images, g, size=224):
    p = sample_train_params(torch.tensor([tuple(i.shape[1:]) for i in images]), generator=g)
    x = flip_batch(crop_resize(pad_images(images), p['boxes'], size), p['flip'])
    return normalize_batch(color_jitter_batch(x, p['factors'], p['order']))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=256); p.add_argument('--data', default=str(MINI))
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == 'cpu': print("CPU RUN: speed numbers below say nothing about a GPU; fidelity numbers hold everywhere.")
    files = sorted(Path(a.data).rglob('*.jpg'))
    ims, _ = decode_items([read_image_bytes(f) for f in files], [str(f) for f in files], dev)
    mixed = (ims * (a.batch_size // len(ims) + 1))[:a.batch_size]
    square = [i for i in ims if tuple(i.shape[1:]) == (512, 512)]
    square = (square * (a.batch_size // len(square) + 1))[:a.batch_size]
    g = make_generator(0)
    print(f"{a.batch_size} images on {dev}: ours mixed sizes {a.batch_size / timed(lambda: ours(mixed, g), dev):,.0f} img/s, "
          f"ours 512x512 {a.batch_size / timed(lambda: ours(square, g), dev):,.0f} img/s")
    try: import kornia.augmentation as K; from kornia.geometry.transform import crop_and_resize
    except ImportError: K = None; print("kornia not installed: pip install kornia for its rows")
    if K is not None:
        aug = K.AugmentationSequential(K.RandomResizedCrop((224, 224), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
                                       K.RandomHorizontalFlip(p=0.5), K.ColorJitter(0.2, 0.2, 0.2, p=1.0)).to(dev)
        mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1); std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
        xs = torch.stack(square)
        kf = lambda: (aug(xs.float() / 255) - mean) / std
        print(f"kornia 512x512 {a.batch_size / timed(kf, dev):,.0f} img/s")
    # fidelity to PIL for the same boxes (40 images)
    some = ims[:40]
    boxes, _ = sample_crop_boxes(torch.tensor([tuple(i.shape[1:]) for i in some]), generator=make_generator(0))
    pil = torch.stack([pil_to_tensor(TF.resized_crop(TF.to_pil_image(i.cpu()), *b.tolist(), [224, 224])) for i, b in zip(some, boxes)]).float()
    rows = {'ours roi_align': crop_resize(pad_images(some), boxes, 224).cpu()}
    if K is not None:
        corners = lambda t, l, h, w: torch.tensor([[[l, t], [l + w - 1, t], [l + w - 1, t + h - 1], [l, t + h - 1]]], dtype=torch.float32, device=dev)
        rows['kornia crop_and_resize'] = torch.cat([crop_and_resize(i[None].float(), corners(*b.tolist()), (224, 224)) for i, b in zip(some, boxes)]).cpu()
    for name, o in rows.items():
        d = (normalize_batch(o) - normalize_batch(pil)).abs()
        print(f"{name:24s} vs PIL resized_crop: mean {d.mean():.4f}, max {d.max():.3f} (normalised units)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
