"""Benchmark (not a test): peak memory and time of the GPU pipeline's training crop for a batch of large photos, on the
CPU: one padded canvas (`pad_images` + `crop_resize`, the old path) against one `roi_align` per image shape
(`crop_resize_groups`, what `GPUBatchPipeline` uses now). The same tensors would live in GPU memory on CUDA.

    PYTHONPATH=. python3 bench/crop_memory.py                 # 8 phone photos, 4000x3000 and 3000x4000 alternating
    PYTHONPATH=. python3 bench/crop_memory.py --n 16 --size 2000 1500

Each variant runs in a fresh child process; its peak resident memory (ru_maxrss) minus the images' own footprint is
what the crop needed. Prints both, their ratio, and checks the outputs agree.
"""
import argparse, json, resource, subprocess, sys, time

CHILD = r'''
import json, resource, sys, time, torch
from nutrilearn_train.config import make_generator
from nutrilearn_train.gpu_data import crop_resize, crop_resize_groups, pad_images, sample_crop_boxes
n, h, w, how = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = make_generator(0)
ims = [torch.randint(0, 256, (3, h, w) if i % 2 == 0 else (3, w, h), generator=g, dtype=torch.uint8) for i in range(n)]
boxes, _ = sample_crop_boxes(torch.tensor([tuple(i.shape[1:]) for i in ims]), generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
out = crop_resize(pad_images(ims), boxes) if how == 'canvas' else crop_resize_groups(ims, boxes)
dt = time.perf_counter() - t
print(json.dumps(dict(extra_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, seconds=dt,
                      checksum=float(out.double().sum()))))
'''


def run(n, h, w, how) -> dict:
    r = subprocess.run([sys.executable, '-c', CHILD, str(n), str(h), str(w), how], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=8); p.add_argument('--size', type=int, nargs=2, default=[4000, 3000])
    a = p.parse_args(argv)
    h, w = a.size
    canvas, groups = run(a.n, h, w, 'canvas'), run(a.n, h, w, 'groups')
    print(f"{a.n} images {h}x{w} / {w}x{h}, crop to 224: canvas +{canvas['extra_mib']:.0f} MiB in {canvas['seconds']:.2f} s, "
          f"per-shape groups +{groups['extra_mib']:.0f} MiB in {groups['seconds']:.2f} s; "
          f"memory ratio canvas/groups {canvas['extra_mib'] / max(groups['extra_mib'], 1):.1f}x")
    rel = abs(canvas['checksum'] - groups['checksum']) / abs(canvas['checksum'])
    print(f"outputs agree: relative checksum difference {rel:.2e}")
    return 0 if rel < 1e-6 else 1


if __name__ == '__main__':
    sys.exit(main())
