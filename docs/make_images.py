"""Regenerate the README's sample pictures in docs/img/ from a model fine-tuned on food-101-mini (CPU, ≈ 3 min).

Run from the repository root: `python docs/make_images.py`. Fine-tunes mobilenet_v2 from the real ImageNet weights in
../shared/weights (the recommended recipe of docs/quality.md, 3 epochs) into a temporary folder, then keeps the
top-losses gallery, one `nutrilearn-predict --explain` picture and the `nutrilearn-mine` contact sheet, each checked to
stay under 200 KB.
"""
import os, shutil, subprocess, sys, tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MINI, OUT, BIN = ROOT.parent/'shared/data/food-101-mini', ROOT/'docs/img', Path(sys.executable).parent
WEIGHTS = ROOT.parent/'shared/weights/mobilenet_v2_imagenet.pth'
ENV = {**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'}


def run(*args):
    r = subprocess.run([str(a) for a in args], env=ENV, capture_output=True, text=True)
    if r.returncode: sys.exit(f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def keep(src:Path, name:str, width:int):
    "Copy `src` to docs/img/`name`, scaled to `width` pixels and quantised to 256 colours; refuse anything >= 200 KB."
    im = Image.open(src).convert('RGB')
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS) if im.width > width else im
    im.quantize(256).save(OUT/name, optimize=True)
    size = (OUT/name).stat().st_size
    assert size < 200_000, f"{name} is {size} bytes"
    print(f"docs/img/{name}: {im.size[0]}x{im.size[1]}, {size / 1000:.0f} KB")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        run(BIN/'nutrilearn-train', '--data-dir', MINI, '--weights-path', WEIGHTS, '--freeze-epochs', '1', '--freeze-layers', '0',
            '--layer-decay', '0.7', '--epochs', '3', '--num-workers', '0', '--batch-size', '32', '--seed', '0', '--device', 'cpu', '--checkpoint-dir', d/'ck', '--output-dir', d/'out',
            '--tracking-uri', f'sqlite:///{d}/mlflow.db', '--experiment-name', 'readme')
        keep(d/'out/v1/top_losses.png', 'top_losses.png', 760)
        photo = MINI/'food-101/images'/(((MINI/'food-101/meta/test.txt').read_text().split()[0]) + '.jpg')   # a held-out photo
        run(BIN/'nutrilearn-predict', photo, '--model-dir', d/'out', '--device', 'cpu', '--explain', d/'why')
        keep(d/'why'/f'{photo.stem}_gradcam.png', 'explain.png', 260)
        unlabelled = d/'unlabelled'; unlabelled.mkdir()
        for p in sorted((MINI/'food-101/images').rglob('*.jpg'))[::25]: shutil.copy(p, unlabelled/f'{p.parent.name}_{p.name}')
        run(BIN/'nutrilearn-mine', '--model-dir', d/'out', '--images', unlabelled, '--top', '8', '--output-dir', d/'mine', '--device', 'cpu', '--no-progress')
        keep(d/'mine/uncertain.png', 'mining.png', 640)


if __name__ == '__main__': main()
