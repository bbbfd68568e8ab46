"""The worked example of `nutrilearn-learn` at full size (issue 22 item 4), and the learner's peak memory with a store
10x its size. Not a test (it takes tens of minutes on 2 CPU cores); `tests/test_learn.py` runs a CI-sized version.

    PYTHONPATH=. python3 bench/learn_example.py --work /tmp/learn-example              # both parts
    PYTHONPATH=. python3 bench/learn_example.py --work /tmp/learn-example --part rounds
    PYTHONPATH=. python3 bench/learn_example.py --work /tmp/learn-example --part memory

rounds: a champion trained on food-101-mini (10 Food-101 classes, 45 training and 15 test photos each) with the real
ImageNet backbone (mobilenet_v2, head only); then indian-dishes-mini's training photos (6 dishes nobody trained it on,
45 each) added through `FeedbackStore.add` as user feedback, 10 photos of each dish at a time; after each batch
`nutrilearn-learn --once` as a subprocess (a sqlite MLflow store). Printed per round: the gate's numbers (feedback
held-out top-1 and original test top-1, base -> new), forgetting, the decision, the new version's top-1 on
indian-dishes-mini's untouched test split (90 photos; never fed), and the seconds from the round's last photo to a
promoted model.

memory: the 360 indian-dishes-mini photos re-encoded at 10 JPEG qualities (3,600 distinct photos, 10x the example's
store) and the same 360 photos once (1x); one learner round over each whole store (1 epoch, no rehearsal); the peak
resident memory of the learner process (ru_maxrss from wait4) for both, and their ratio.
"""
import argparse, io, json, os, subprocess, sys, time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'
FOOD, INDIAN, WEIGHTS = SHARED/'data/food-101-mini', SHARED/'data/indian-dishes-mini', SHARED/'weights/mobilenet_v2_imagenet.pth'
BIN = Path(sys.executable).parent
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE', 'PYTHONPATH': str(ROOT)}
NAME = 'nutrilearn-food101'
RECIPE = ['--freeze-layers', '-1', '--epochs', '4', '--batch-size', '16', '--learning-rate', '0.001', '--rehearsal-fraction', '0.5',
          '--num-workers', '0', '--device', 'cpu', '--no-progress']


def run(args: list, log: Path) -> tuple:
    "Run a command, its output to `log`; `(exit status, peak RSS of the process in MiB, seconds)`."
    t = time.time()
    with open(log, 'w') as f: p = subprocess.Popen(args, env=ENV, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode: sys.exit(f"{args[0]} failed (exit {p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return p.returncode, ru.ru_maxrss / 1024, time.time() - t


def champion(work: Path, uri: str):
    if (work/'champion'/'out'/'v1').is_dir(): return
    run([str(BIN/'nutrilearn-train'), '--data-dir', str(FOOD), '--weights-path', str(WEIGHTS), '--freeze-layers', '-1', '--epochs', '5',
         '--batch-size', '32', '--learning-rate', '0.003', '--num-workers', '0', '--device', 'cpu', '--log-interval', '50',
         '--checkpoint-dir', str(work/'champion'/'ck'), '--output-dir', str(work/'champion'/'out'), '--tracking-uri', uri,
         '--experiment-name', 'champion', '--registered-model-name', NAME, '--promote', 'always', '--seed', '1'], work/'champion.log')


def top1_on_indian_test(work: Path, version: int) -> float:
    "The registered version's top-1 on indian-dishes-mini's test split (by class name: these photos are never fed)."
    from nutrilearn_train.data import find_dataset
    from nutrilearn_train.learn import LearnRegistry, score
    reg = LearnRegistry(f"sqlite:///{work}/mlflow.db")
    model, mc = reg.load_version(NAME, version, work/'feedback'/'learner'/'models')
    return score(model, mc, find_dataset(INDIAN)['test'], batch_size=32)[0]


def rounds(work: Path, max_forgetting: float):
    from nutrilearn_train.feedback import FeedbackStore
    from nutrilearn_train.learn import read_state, round_dirs, round_rows, format_rounds
    uri = f"sqlite:///{work}/mlflow.db"
    champion(work, uri)
    dishes = sorted(p.name for p in (INDIAN/'train').iterdir())
    args = [str(BIN/'nutrilearn-learn'), '--store', str(work/'feedback'), '--base', f'models:/{NAME}@champion', '--data-dir', str(FOOD),
            '--tracking-uri', uri, '--min-new', '60', '--min-per-new-class', '10', '--max-forgetting', str(max_forgetting), *RECIPE]
    extra = []
    for r in range(5):
        with FeedbackStore(work/'feedback') as s:
            for d in dishes:
                for i, p in enumerate(sorted((INDIAN/'train'/d).iterdir())[10 * r:10 * r + 10]): s.add(p, d, source=f'user:{10 * r + i}')
        fed = time.time()
        _, rss, secs = run(args + (['--force'] if r == 4 else []), work/f'round{r + 1}.log')   # the last batch has 5 photos per dish
        rdir = round_dirs(work/'feedback'/'learner')[-1]
        st = read_state(rdir)
        extra.append(dict(round=r + 1, indian_test=top1_on_indian_test(work, st['version']), rss=rss, learner_s=secs,
                          to_promoted=dict(st['history'])['done'] - fed if st['promoted'] else None))
        print(format_rounds(round_rows(work/'feedback'/'learner'))); print(extra[-1], flush=True)
    table = format_rounds(round_rows(work/'feedback'/'learner')).splitlines()
    print('\n'.join([table[0] + '  indian test  to promoted'] + [f"{row}  {e['indian_test']:10.1%}  "
          + (f"{e['to_promoted']:.0f} s" if e['to_promoted'] else '-') for row, e in zip(table[1:], extra)]))
    print(f"learner peak RSS per round (MiB): {[round(e['rss']) for e in extra]}")
    (work/'rounds.json').write_text(json.dumps(dict(table=table, extra=extra), indent=1))


def variants(src: Path, k: int) -> list:
    "`k` byte-distinct versions of the photo `src`: re-encoded at JPEG quality 95, 90, ..."
    im = Image.open(src).convert('RGB')
    out = []
    for q in range(95, 95 - 5 * k, -5):
        b = io.BytesIO(); im.save(b, 'JPEG', quality=q); out.append(b.getvalue())
    return out


def memory(work: Path):
    "Peak RSS of one learner round over a 1x and a 10x store (every photo of the store in that round)."
    from nutrilearn_train.feedback import FeedbackStore
    uri = f"sqlite:///{work}/mlflow.db"
    champion(work, uri)
    photos = sorted(p for split in ('train', 'test') for p in (INDIAN/split).rglob('*.jpg'))
    res, base = {}, 'memory-base'   # a copy of the champion: these rounds must not move the example's @champion
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    if not client.search_model_versions(f"name = '{base}'"): client.copy_model_version(f"models:/{NAME}/1", base)
    for k in (1, 10):
        store = work/f'store{k}x'
        if not (store/'index.db').is_file():
            with FeedbackStore(store) as s:
                for p in photos:
                    for j, data in enumerate(variants(p, k)): s.add(data, p.parent.name, source=f'user:{j}')
        with FeedbackStore(store) as s: n = s.count_since(0)['photos']
        args = [str(BIN/'nutrilearn-learn'), '--store', str(store), '--base', f'models:/{base}/1', '--data-dir', str(FOOD), '--tracking-uri', uri,
                '--experiment-name', f'memory-{k}x', '--min-new', '1', '--min-per-new-class', '10', '--once',
                *RECIPE[:2], '--epochs', '1', '--batch-size', '32', '--rehearsal-fraction', '0', *RECIPE[-5:]]
        _, rss, secs = run(args, work/f'memory{k}x.log')
        res[k] = dict(photos=n, peak_rss_mib=rss, seconds=secs)
        print(f"{k}x store: {n} photos, one round over all of them: peak RSS {rss:.0f} MiB, {secs:.0f} s", flush=True)
    print(f"peak RSS 10x / 1x: {res[10]['peak_rss_mib'] / res[1]['peak_rss_mib']:.2f}")
    (work/'memory.json').write_text(json.dumps(res, indent=1))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--work', required=True, help='a folder for the stores, the MLflow database and the logs (reused: the champion is trained once)')
    ap.add_argument('--part', choices=('rounds', 'memory', 'both'), default='both')
    ap.add_argument('--max-forgetting', type=float, default=1.0, help="the gate's limit for the rounds")
    a = ap.parse_args()
    work = Path(a.work).resolve(); work.mkdir(parents=True, exist_ok=True)
    if a.part in ('rounds', 'both'): rounds(work, a.max_forgetting)
    if a.part in ('memory', 'both'): memory(work)
