"""Benchmark (not a test): what one hostile image costs `load_image` + the validation transform, before and after the
image limits (issue 21, item 2). The image is a 16-bit greyscale PNG of 9400 x 9400 pixels, all zeros: ≈ 170 KB on
the wire, 88.4 Mpx, just under PIL's own 89.5 Mpx limit (which was also ours before).

    PYTHONPATH=. python3 bench/image_limits.py                 # baseline: load_image of commit f3a823f (main before the fix)
    PYTHONPATH=. python3 bench/image_limits.py --side 6000     # an image under the new 64 Mpx limit: only the conversion differs

Cases, each in a fresh child process (peak resident memory via ru_maxrss, minus the peak after start-up; wall time):
  before         the baseline revision's `load_image` (read from git) + `build_val_transform()`
  after          this checkout's `load_image` with its defaults: refused from the header (`BadImageError`)
  after-raised   this checkout's `load_image` with `max_pixels` raised to the old 89,478,485: decoded, converted in bands
"""
import argparse, json, struct, subprocess, sys, tempfile, zlib
from pathlib import Path

CHILD = r'''
import importlib.util, json, resource, subprocess, sys, time
case, png, rev = sys.argv[1], sys.argv[2], sys.argv[3]
import nutrilearn_train.data as data
if case == 'before':   # the baseline revision's data.py, as a module of this package (its `.config` import resolves here)
    src = subprocess.run(['git', 'show', f'{rev}:nutrilearn_train/data.py'], capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader('nutrilearn_train._data_baseline', loader=None)
    mod = importlib.util.module_from_spec(spec); mod.__package__ = 'nutrilearn_train'; exec(compile(src, f'{rev}:data.py', 'exec'), mod.__dict__)
    load, kw = mod.load_image, {}
else: load, kw = data.load_image, ({'max_pixels': 89_478_485} if case == 'after-raised' else {})
tfm, raw = data.build_val_transform(), open(png, 'rb').read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try: out, shape = 'answered', tuple(tfm(load(raw, **kw)).shape)
except data.BadImageError as e: out, shape = f'refused: {e.reason[:90]}', None
dt = time.perf_counter() - t
print(json.dumps(dict(extra_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, seconds=dt, outcome=out, shape=shape)))
'''


def png16(side:int) -> bytes:
    "An all-zero 16-bit greyscale PNG `side` x `side`, compressed row by row (never held uncompressed)."
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    z, row, idat = zlib.compressobj(9), bytes(1 + 2 * side), []
    for _ in range(side): idat.append(z.compress(row))
    idat.append(z.flush())
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 16, 0, 0, 0, 0))
            + chunk(b'IDAT', b''.join(idat)) + chunk(b'IEND', b''))


def run(case:str, png:Path, rev:str) -> dict:
    r = subprocess.run([sys.executable, '-c', CHILD, case, str(png), rev], capture_output=True, text=True)
    if r.returncode: sys.exit(f"{case}: the child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--side', type=int, default=9400, help='image side in pixels')
    p.add_argument('--baseline-rev', default='f3a823f', help='git revision whose load_image is the "before" case')
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        png = Path(d)/'zeros16.png'; png.write_bytes(png16(a.side))
        print(f"16-bit greyscale PNG, {a.side} x {a.side} = {a.side ** 2 / 1e6:.1f} Mpx, {png.stat().st_size / 1e3:.0f} KB; "
              f"load_image + build_val_transform(), one fresh process per case")
        res = {c: run(c, png, a.baseline_rev) for c in ('before', 'after', 'after-raised')}
    for c, r in res.items():
        print(f"  {c:<13} {r['extra_mib']:8.1f} MiB peak  {r['seconds']:7.3f} s  {r['outcome']}" + (f" {r['shape']}" if r['shape'] else ''))
    b = res['before']
    for c in ('after', 'after-raised'):
        r = res[c]
        print(f"  {c} vs before: memory x{r['extra_mib'] / max(b['extra_mib'], 1e-9):.3f}, time x{r['seconds'] / b['seconds']:.3f}")


if __name__ == '__main__': main()
