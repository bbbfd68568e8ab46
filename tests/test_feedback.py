"""Issue 22, the feedback store: the majority/tie rule and content addressing hold over random label events (hypothesis),
`upto` snapshots never change, two writer *processes* adding at once lose and double-count nothing, and `nutrilearn-feedback`
runs as a real process over the indian-dishes-mini photos."""
import csv, hashlib, io, itertools, json, os, shutil, subprocess, sys, tempfile, time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings, strategies as st
from PIL import Image

from nutrilearn_train.feedback import FeedbackStore, held_out_score, index_metadata, is_held_out, majority_label, normalize_label

DISHES = Path(__file__).parents[1].parent/'shared/data/indian-dishes-mini'
BIN = Path(sys.executable).parent
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}
LABELS = ['chai', 'samosa', 'momos', 'jalebi']
SOURCES = ['user:1', 'user:2', 'user:3', 'app']
_fresh = itertools.count(1)


def photo(n: int, fmt='PNG') -> bytes:
    "A small image whose bytes differ for every `n` (a pixel spells `n`)."
    im = Image.new('RGB', (8, 8), (90, 140, 60))
    im.putpixel((0, 0), (n % 256, (n >> 8) % 256, (n >> 16) % 256)); im.putpixel((1, 0), ((n >> 24) % 256, 0, 0))
    b = io.BytesIO(); im.save(b, fmt); return b.getvalue()


def by_definition(labels) -> str | None:
    "The label with strictly more votes than every other label, written as the definition reads (None if there is none)."
    c = Counter(labels)
    winners = [l for l in c if all(c[l] > c[m] for m in c if m != l)]
    return winners[0] if winners else None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LABELS), max_size=12))
def test_majority_label_is_the_strict_majority(labels):
    assert majority_label(Counter(labels)) == by_definition(labels)


_tmp = tempfile.TemporaryDirectory()
_stores = {}
def shared_store() -> FeedbackStore:
    "One store for the per-photo properties (each example gets a fresh photo); opening a store per example would dominate."
    if 'store' not in _stores: _stores['store'] = FeedbackStore(Path(_tmp.name)/'shared')
    return _stores['store']


events = st.lists(st.tuples(st.sampled_from(LABELS + [' Chai', 'SAMOSA ']), st.sampled_from(SOURCES)), min_size=1, max_size=10)

@settings(max_examples=120, deadline=None)
@given(events)
def test_store_label_is_the_majority_of_distinct_events(evs):
    "A photo's label is the strict majority over its distinct (source, label) events; a tie gives None; repeats change nothing."
    store, data = shared_store(), photo(next(_fresh))
    head0 = store.head()
    results = [store.add(data, label, source=source) for label, source in evs]
    distinct = {(normalize_label(l), s) for l, s in evs}
    (sha, path, label), = store.items([results[0].sha])
    assert sha == hashlib.sha256(data).hexdigest() and path.read_bytes() == data
    assert label == by_definition([l for l, _ in distinct])
    assert [r.new_photo for r in results] == [True] + [False] * (len(evs) - 1)
    assert sum(r.new_event for r in results) == len(distinct) == store.head() - head0
    assert all(not store.add(data, l, source=s).new_event for l, s in reversed(evs))   # again, in another order
    assert store.head() == head0 + len(distinct)


adds = st.lists(st.tuples(st.integers(0, 4), st.sampled_from(LABELS), st.sampled_from(SOURCES), st.booleans()), min_size=1, max_size=14)

@settings(max_examples=100, deadline=None)
@given(adds, st.integers(0, 14))
def test_content_addressing_and_snapshots(seq, cut):
    "One file and one row per distinct photo bytes, one event per distinct key; and the store as of a cursor never changes."
    base, cut = next(_fresh) * 10, min(cut, len(seq))
    with tempfile.TemporaryDirectory() as d, FeedbackStore(d) as store:
        src = Path(d)/'in'; src.mkdir()
        files = {k: (src/f'{k}.png').write_bytes(photo(base + k)) and src/f'{k}.png' for k in range(5)}
        cursor, cut_votes = 0, {}
        for i, (k, label, source, by_path) in enumerate(seq):
            store.add(files[k] if by_path else files[k].read_bytes(), label, source=source)
            if i + 1 == cut: cursor, cut_votes = store.head(), {v.sha: v.votes for v in store.votes()}
        keys = {(k, label, source) for k, label, source, _ in seq}
        shas = {hashlib.sha256(files[k].read_bytes()).hexdigest() for k, *_ in seq}
        stored = [p for p in (Path(d)/'images').rglob('*') if p.is_file()]
        assert sorted(p.stem for p in stored) == sorted(shas)
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in stored)
        assert store.count_since(0) == dict(photos=len(shas), events=len(keys)) and store.head() == len(keys)
        assert {v.sha: v.votes for v in store.votes(upto=cursor)} == cut_votes         # the snapshot as of the cursor
        assert store.count_since(cursor)['events'] == len(keys) - cursor
        later = {v.sha for v in store.votes(after=cursor)}
        first_after = {hashlib.sha256(files[k].read_bytes()).hexdigest() for k, label, source, _ in seq[cut:]
                       if (k, label, source) not in {(a, b, c) for a, b, c, _ in seq[:cut]}}
        assert later == first_after                                                     # exactly the photos with new events


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.floats(0, 0.99), st.floats(0, 0.99))
def test_held_out_is_fixed_by_content_and_monotone_in_share(data, a, b):
    sha = hashlib.sha256(data).hexdigest()
    lo, hi = sorted((a, b))
    assert 0 <= held_out_score(sha) < 1
    assert is_held_out(sha, 'chai', lo) <= is_held_out(sha, 'chai', hi)               # raising a share only adds photos
    assert is_held_out(sha, 'chai', lo) == is_held_out(sha, 'samosa', {'samosa': lo})  # the label only picks the share


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_normalize_label_is_idempotent_snake_case(text):
    try: key = normalize_label(text)
    except ValueError: return
    assert normalize_label(key) == key and key == key.lower() and ' ' not in key and not key.startswith('_') and '__' not in key


WRITER = r"""
import json, sys, time
from pathlib import Path
from nutrilearn_train.feedback import FeedbackStore
store_dir, index_url, plan_file, go, out = sys.argv[1:6]
plan = json.loads(Path(plan_file).read_text())
while not Path(go).exists(): time.sleep(0.002)
log, slowest = [], 0.0
with FeedbackStore(store_dir, index_url or None) as store:    # both open a fresh store at once: the tables are created once
    for p, label, source, pid in plan:
        for _ in range(2):                                       # every add is retried: a retry must not count twice
            t = time.perf_counter()
            r = store.add(p, label, source=source, prediction_id=pid)
            slowest = max(slowest, time.perf_counter() - t)
            log.append([r.seq, r.new_event, r.new_photo, r.sha])
Path(out).write_text(json.dumps(dict(log=log, slowest=slowest)))
"""
PG_URL = os.environ.get('NUTRILEARN_FEEDBACK_PG_URL')   # a scratch PostgreSQL database, e.g. postgresql+psycopg://u:p@127.0.0.1/feedback_test


def writer_plan(w: int, photos: list, n: int = 60) -> list:
    "Writer `w`'s adds: photos overlapping with the other writer's, conflicting labels on some, with and without prediction ids."
    plan = []
    for i in range(n):
        k = (7 * i + 5 * w) % len(photos)
        label = LABELS[k % 3] if k < 8 else LABELS[(k + w) % 4]        # photos 8.. get conflicting labels from the two writers
        plan.append([str(photos[k]), label, f'writer:{w}', f'w{w}-{i}' if i % 2 else None])
    return plan


# SQLite always; the same test against PostgreSQL where a scratch database is given (opt-in, not part of CI: no server there)
@pytest.mark.parametrize('backend', ['sqlite'] + (['postgresql'] if PG_URL else []))
def test_two_writer_processes(tmp_path, backend):
    "Two processes add at once to one store: neither fails, and the counts are exact (no lost and no double events)."
    if backend == 'postgresql':
        engine = sa.create_engine(PG_URL); index_metadata.drop_all(engine); engine.dispose()   # a fresh index
    photos = sorted((DISHES/'train'/'samosa').glob('*.jpg'))[:12]      # real photos: decoding them takes real time between locks
    plans = {w: writer_plan(w, photos) for w in (1, 2)}
    for w, plan in plans.items(): (tmp_path/f'plan{w}.json').write_text(json.dumps(plan))
    go, store_dir = tmp_path/'go', tmp_path/'store'
    procs = {w: subprocess.Popen([sys.executable, '-c', WRITER, str(store_dir), PG_URL if backend == 'postgresql' else '',
                                  str(tmp_path/f'plan{w}.json'), str(go), str(tmp_path/f'log{w}.json')],
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2)}
    time.sleep(5)                                          # let both import torch and wait at the barrier
    go.write_text('go')
    outs = {w: p.communicate(timeout=300) for w, p in procs.items()}
    for w, p in procs.items(): assert p.returncode == 0, outs[w][1][-3000:]
    res = {w: json.loads((tmp_path/f'log{w}.json').read_text()) for w in (1, 2)}
    logs = {w: r['log'] for w, r in res.items()}

    sha = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in photos}
    expected = {}                                          # the distinct events, by the rule: a prediction id, else (photo, source, label)
    for plan in plans.values():
        for p, label, source, pid in plan: expected.setdefault(('p', pid) if pid else ('e', sha[p], source, label), (sha[p], label))
    votes = {}
    for s, label in expected.values(): votes.setdefault(s, Counter())[label] += 1

    new_seqs = sorted(seq for log in logs.values() for seq, new, _, _ in log if new)
    assert new_seqs == list(range(1, len(expected) + 1))   # each event recorded once, gap-free
    assert all(not new for log in logs.values() for _, new, _, _ in log[1::2])   # every retry was a no-op
    assert sum(new_photo for log in logs.values() for *_, new_photo, _ in log) == len(photos)
    with FeedbackStore(store_dir, PG_URL if backend == 'postgresql' else None) as store:
        assert store.head() == len(expected) and store.count_since(0) == dict(photos=len(photos), events=len(expected))
        assert {v.sha: Counter(v.votes) for v in store.votes()} == votes
        assert {s for s, _, l in store.items(sha.values()) if l is None} == {s for s, c in votes.items() if majority_label(c) is None}
    stored = sorted(p for p in (store_dir/'images').rglob('*') if p.is_file())
    assert [p.stem for p in stored] == sorted(sha.values()) and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in stored)
    owner = [w for _, w in sorted((seq, w) for w, log in logs.items() for seq, new, _, _ in log if new)]
    switches = sum(a != b for a, b in zip(owner, owner[1:]))
    print(f"{backend}: {len(expected)} events from 2 writers, {switches} switches between writers in commit order, "
          f"slowest add {1000 * max(r['slowest'] for r in res.values()):.0f} ms")
    assert switches >= 2, owner                            # the writers really interleaved


def run_cli(*args, cwd):
    return subprocess.run([str(BIN/'nutrilearn-feedback'), *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_cli_on_real_photos(tmp_path):
    "import DIR, stats --json, add and a re-import, as real processes on indian-dishes-mini; numbers checked against its manifest."
    manifest = [r for r in csv.DictReader(open(DISHES/'manifest.csv')) if r['split'] == 'train']
    classes = sorted({r['class'] for r in manifest})
    store = tmp_path/'fb'
    r = run_cli('import', DISHES/'train', '--store', store, '--no-progress', cwd=tmp_path)
    assert r.returncode == 0 and f': {len(manifest)} label events added, 0 already recorded, 0 files skipped; store head {len(manifest)}' in r.stdout, r

    r = run_cli('stats', '--store', store, '--classes', *classes[:-1], '--json', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s['photos'], s['events'], s['labelled'], s['tied'], s['head']) == (len(manifest),) * 3 + (0, len(manifest))
    for c in classes:
        rows = [m for m in manifest if m['class'] == c]
        held = sum(held_out_score(m['sha256']) < 0.2 for m in rows)            # the held-out rule, on the manifest's own sha256
        assert s['labels'][c] == dict(votes=len(rows), photos=len(rows), majority=len(rows), tied=0, held_out=held), (c, s['labels'][c])
    assert s['classes']['ready'] == {classes[-1]: 45} and s['classes']['classes'] == classes   # the unknown class has >= 20 photos
    stored = sorted(p for p in (store/'images').rglob('*') if p.is_file())
    assert sorted(p.stem for p in stored) == sorted(m['sha256'] for m in manifest) and {p.suffix for p in stored} == {'.jpg'}

    bad = tmp_path/'more'/'Vada Pav'; bad.mkdir(parents=True)
    for m in manifest[:3]: shutil.copy(DISHES/m['path'], bad)
    (bad/'cut.jpg').write_bytes((DISHES/manifest[5]['path']).read_bytes()[:2000]); (bad/'empty.jpg').write_bytes(b'')
    r = run_cli('import', tmp_path/'more', '--store', store, '--source', 'import:more', '--no-progress', cwd=tmp_path)
    assert r.returncode == 0 and ': 3 label events added, 0 already recorded, 2 files skipped' in r.stdout, r
    assert f"skipped {bad/'cut.jpg'}: bad image" in r.stderr and f"skipped {bad/'empty.jpg'}: bad image" in r.stderr, r.stderr

    test_photo = sorted((DISHES/'test'/'chai').iterdir())[0]
    r = run_cli('add', test_photo, '--label', 'Vada-Pav', '--source', 'user:cli', '--store', store, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"added: {test_photo} as 'vada_pav'") and 'new photo' in r.stdout, r
    r = run_cli('import', DISHES/'train', '--store', store, '--no-progress', cwd=tmp_path)
    assert r.returncode == 0 and f': 0 label events added, {len(manifest)} already recorded' in r.stdout, r

    r = run_cli('stats', '--store', store, '--classes', *classes, '--min-per-new-class', '20', cwd=tmp_path)
    assert r.returncode == 0 and f'{len(manifest) + 1} photos, {len(manifest) + 4} label events: {len(manifest) - 2} labelled, 3 tied' in r.stdout, r
    assert 'new classes ready (>= 20 photos): none; waiting: vada_pav (1)' in r.stdout, r.stdout
    r = run_cli('add', DISHES/'nowhere.jpg', '--label', 'chai', '--store', store, cwd=tmp_path)
    assert r.returncode == 2 and 'image file not found' in r.stderr, r
