"""Issue 22 items 3-4: `nutrilearn-learn`, continual training rounds from the feedback store.

Property tests (hypothesis) of the pure parts: the reservoir, the gate rule, the held-out rule, manifest digests and the
round state machine. Then the real thing, as a user runs it: `nutrilearn-learn` as a subprocess against a real
`mlflow server`, on real photos with the real ImageNet backbone (head only, on CPU):

- `test_teach_new_dishes_in_rounds`: a champion trained on 4 Food-101 classes, then 3 Indian dishes fed in as user feedback,
  10 photos of each per round; prints the round-by-round table and the time from the round's last photo to a promoted model.
  (The full example, 10 classes and 6 dishes, is `bench/learn_example.py`: too slow for CI on 2 cores.)
- `test_kill_9_anywhere`: the learner killed with SIGKILL during training, right after registering and while gating,
  then restarted: exactly one registered version per round, the cursor where the last round ended, every photo in
  exactly one round's manifest.
"""
import json, os, subprocess, sys, time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from nutrilearn_train.learn import (DIGEST_TAG, STATES, LockHeldError, advance, learner_lock, gate_decision, held_out, held_out_score, manifest_digest, new_state,
                                    read_manifest, read_state, reservoir_update, round_dirs, round_rows, format_rounds, seal_manifest)

SHARED = Path(__file__).resolve().parents[1].parent/'shared'
FOOD, INDIAN, WEIGHTS = SHARED/'data/food-101-mini', SHARED/'data/indian-dishes-mini', SHARED/'weights/mobilenet_v2_imagenet.pth'
BIN = Path(sys.executable).parent

# --------------------------------------------------------------------------------------------------------------------
# properties

stream = st.lists(st.text(alphabet='0123456789abcdef', min_size=8, max_size=8), unique=True, max_size=60)

@settings(max_examples=200, deadline=None)
@given(items=stream, size=st.integers(0, 20), seed=st.integers(0, 2**31), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_reservoir_bounded_seeded_and_the_same_in_rounds(items, size, seed, cuts):
    whole = reservoir_update([], 0, items, size, seed)
    r, n, start = [], 0, 0
    for c in sorted(cuts) + [len(items)]:                         # the same stream, fed round by round
        r, n = reservoir_update(r, n, items[start:max(start, c)], size, seed); start = max(start, c)
    assert (r, n) == whole
    assert len(whole[0]) == min(size, len(items)) and whole[1] == len(items)
    assert set(whole[0]) <= set(items) and len(set(whole[0])) == len(whole[0])   # items of the stream, each once
    assert whole == reservoir_update([], 0, items, size, seed)                    # deterministic


def test_reservoir_is_uniform():
    "Every photo of a 100-photo stream ends up in a reservoir of 20 with probability 0.2 (over 2,000 seeds)."
    xs = [f'p{i:03d}' for i in range(100)]
    hits = Counter(x for s in range(2000) for x in reservoir_update([], 0, xs, 20, s)[0])
    rates = [hits[x] / 2000 for x in xs]
    assert max(abs(r - .2) for r in rates) < .045, (min(rates), max(rates))
    assert abs(sum(rates[:50]) - sum(rates[50:])) / 50 < .02                      # no preference for early or late photos


acc = st.floats(0, 1)

@settings(max_examples=300, deadline=None)
@given(hn=acc, hb=acc, on=acc, ob=acc, n=st.integers(0, 50), limit=st.floats(0, 20), up=st.floats(0, 1))
def test_gate_rule(hn, hb, on, ob, n, limit, up):
    ok, why, f = gate_decision(hn, hb, on, ob, n, limit)
    assert isinstance(why, str) and why
    if n == 0: assert not ok and f is None; return
    assert abs(f - 100 * (ob - on)) < 1e-9
    assert ok == (hn > hb and f <= limit + 1e-9)                                # better on the held-out set, forgets at most `limit`
    if ok:                                                                       # monotone: more of what the gate wants keeps it passing
        assert gate_decision(min(1, hn + up), hb, min(1, on + up), ob, n, limit + up)[0]
        assert not gate_decision(hn, hn, on, ob, n, limit)[0]                    # an equal held-out score never passes


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=64), share=st.floats(0, .99), more=st.floats(0, .99))
def test_held_out_rule(data, share, more):
    import hashlib
    sha = hashlib.sha256(data).hexdigest()
    assert 0 <= held_out_score(sha) < 1 and held_out(sha, share) == held_out(sha, share)
    assert held_out(sha, share) <= held_out(sha, max(share, more))                # a larger share only adds photos


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) |
                           st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=10)

@settings(max_examples=200, deadline=None)
@given(m=st.dictionaries(st.text(max_size=6).filter(lambda k: k != 'digest'), json_values, max_size=6), key=st.text(min_size=1, max_size=6))
def test_manifest_digest(m, key):
    sealed = seal_manifest(m)
    assert manifest_digest(dict(reversed(list(sealed.items())))) == sealed['digest']   # key order does not matter
    if key != 'digest': assert seal_manifest({**m, key: ['changed', key]})['digest'] != sealed['digest'] or m.get(key) == ['changed', key]


@settings(max_examples=200, deadline=None)
@given(path=st.lists(st.sampled_from(STATES), max_size=8))
def test_states_only_move_forward(path):
    s = new_state(now=0.)
    for to in path:
        info = dict(version=1, gate={}, promoted=False, reason='r')
        if STATES.index(to) > STATES.index(s['state']): s = advance(s, to, now=1., **info)
        else:
            with pytest.raises(ValueError, match='states only move forward'): advance(s, to, **info)
    assert [h for h, _ in s['history']] == sorted({h for h, _ in s['history']}, key=STATES.index)


# --------------------------------------------------------------------------------------------------------------------
# the real command: a champion, feedback, rounds

needs_data = pytest.mark.skipif(not (FOOD.is_dir() and INDIAN.is_dir() and WEIGHTS.is_file()), reason=f'the shared data or weights are missing under {SHARED}')
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}


def original_subset(root: Path, classes: list, n_train: int, n_test: int) -> Path:
    "An ImageFolder train/ + test/ tree of symlinks to the first photos of `classes` in food-101-mini's official splits."
    base = FOOD/'food-101'
    for split, n in (('train', n_train), ('test', n_test)):
        ids = json.loads((base/'meta'/f'{split}.json').read_text())
        for c in classes:
            (root/split/c).mkdir(parents=True)
            for i in ids[c][:n]: (root/split/c/f"{Path(i).name}.jpg").symlink_to(base/'images'/f"{i}.jpg")
    return root


def train_champion(d: Path, uri: str, data: Path, name: str, epochs: int):
    "`nutrilearn-train` with the real backbone, head only, registered as `name` and promoted to @champion."
    r = subprocess.run([str(BIN/'nutrilearn-train'), '--data-dir', str(data), '--weights-path', str(WEIGHTS), '--freeze-layers', '-1',
                        '--epochs', str(epochs), '--batch-size', '16', '--learning-rate', '0.003', '--num-workers', '0', '--device', 'cpu',
                        '--checkpoint-dir', str(d/'ck'), '--output-dir', str(d/'out'), '--tracking-uri', uri, '--experiment-name', f'{name}-champion',
                        '--registered-model-name', name, '--promote', 'always', '--seed', '1'],
                       cwd=d.parent, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def feed(store: Path, dishes: list, start: int, n: int) -> float:
    "Photos start..start+n of each dish (train split) added as user feedback, one user per photo; the time of the last add."
    from nutrilearn_train.feedback import FeedbackStore
    with FeedbackStore(store) as s:
        for d in dishes:
            for i, p in enumerate(sorted((INDIAN/'train'/d).iterdir())[start:start + n]): s.add(p, d, source=f'user:{start + i}')
    return time.time()


def learn_args(store: Path, uri: str, data: Path, name: str, *extra) -> list:
    return [str(BIN/'nutrilearn-learn'), '--store', str(store), '--base', f'models:/{name}@champion', '--data-dir', str(data), '--tracking-uri', uri,
            '--experiment-name', f'{name}-learn', '--min-per-new-class', '10', '--freeze-layers', '-1', '--batch-size', '16',
            '--learning-rate', '0.003', '--num-workers', '0', '--device', 'cpu', '--no-progress', *extra]


def run_learn(args: list, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@needs_data
def test_teach_new_dishes_in_rounds(tmp_path, mlflow_server):
    "Item 4, CI-sized: 3 dishes, 10 photos each per round, 2 rounds; the gate's numbers, the decisions and the registry agree."
    from mlflow import MlflowClient
    uri, name, dishes = mlflow_server, 'learn-ci', ['chai', 'jalebi', 'momos']
    data = original_subset(tmp_path/'orig', ['apple_pie', 'beef_carpaccio', 'beignets', 'bibimbap'], 12, 15)
    train_champion(tmp_path/'champion', uri, data, name, epochs=5)
    client, store, champions, fed = MlflowClient(uri), tmp_path/'feedback', [], []
    for r in range(2):
        fed.append(feed(store, dishes, 10 * r, 10))
        out = run_learn(learn_args(store, uri, data, name, '--min-new', '30', '--epochs', '4', '--rehearsal-fraction', '0.5')).stdout
        assert f"round {r + 1:04d}: store events {30 * r}..{30 * r + 30}" in out, out[-2000:]
        champions.append(int(client.get_model_version_by_alias(name, 'champion').version))
    rows = round_rows(store/'learner')
    print('\n' + format_rounds(rows))
    champion = 1
    for row, rdir, t_fed, after in zip(rows, round_dirs(store/'learner'), fed, champions):
        m, st = read_manifest(rdir), read_state(rdir)
        assert row['state'] == 'done' and row['base'] == champion and set(m['classes'][:4]) == {'apple_pie', 'beef_carpaccio', 'beignets', 'bibimbap'}
        assert row['held_out'] > 0 and row['held_out_new'] >= .5                                 # it learnt the dishes (chance: 1/7)
        if champion == 1: assert row['held_out_base'] == 0                                          # the first base knows none of them
        assert abs(row['forgetting'] - 100 * (row['original_base'] - row['original_new'])) < 1e-9 and st['gate']['original']['n'] == 60
        ok, why, _ = gate_decision(row['held_out_new'], row['held_out_base'], row['original_new'], row['original_base'], row['held_out'], 1.0)
        assert row['promoted'] == ok and row['reason'] == why
        mv = client.get_model_version(name, str(row['version']))
        assert mv.tags['promotion'] == ('promoted' if ok else 'not promoted') and mv.tags[DIGEST_TAG] == m['digest']
        assert mv.description.startswith(f"nutrilearn-learn round {m['round']} from models:/{name}/{champion}") and 'Gate: feedback held-out top-1' in mv.description
        assert client.get_run(mv.run_id).data.tags['learn_round_digest'] == m['digest']      # the run is tagged too (lineage)
        champion = row['version'] if ok else champion
        assert after == champion                                                              # @champion moved exactly when promoted
        if ok: print(f"round {row['round']}: {dict(st['history'])['done'] - t_fed:.0f} s from its last photo to a promoted model")


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 600):
    "Poll `cond()` every 50 ms until it holds; fail if `proc` ends first or time runs out."
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"nutrilearn-learn ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(.05)


def kill_when(args: list, cond, what: str, log: Path) -> str:
    "Start the learner, SIGKILL it as soon as `cond()` holds; its output."
    with open(log, 'w') as f: proc = subprocess.Popen(args, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try: wait_for(cond, proc, what)
    finally: proc.kill(); proc.wait()
    return log.read_text()


@needs_data
def test_kill_9_anywhere(tmp_path, mlflow_server):
    "SIGKILL during training, right after registration and while gating; each restart goes on: one version per round, nothing lost or counted twice."
    from mlflow import MlflowClient
    from nutrilearn_train.feedback import FeedbackStore
    uri, name, dishes = mlflow_server, 'learn-kill', ['chai', 'momos']
    data = original_subset(tmp_path/'orig', ['apple_pie', 'bibimbap'], 6, 4)
    train_champion(tmp_path/'champion', uri, data, name, epochs=1)
    store, client = tmp_path/'feedback', MlflowClient(uri)
    feed(store, dishes, 0, 10)
    args = learn_args(store, uri, data, name, '--min-new', '20', '--epochs', '3', '--rehearsal-fraction', '0')
    rdir, versions = store/'learner'/'rounds'/'0001', lambda: sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    state = lambda: read_state(rdir)['state'] if (rdir/'state.json').is_file() else None
    log = tmp_path/'learn.log'

    # 1. during training, once epoch 1's checkpoint is on disk; meanwhile no other learner may start
    with open(log, 'w') as f: proc = subprocess.Popen(args, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (store/'learner'/'lock').is_file() and (store/'learner'/'lock').read_text().strip() == str(proc.pid), proc, 'the lock')
        with pytest.raises(LockHeldError, match=f"another nutrilearn-learn \\(pid {proc.pid}\\) is running"):
            with learner_lock(store/'learner'): pass
        wait_for(lambda: (rdir/'checkpoints'/'last.pth').is_file(), proc, "epoch 1's checkpoint")
    finally: proc.kill(); proc.wait()
    assert (state(), versions()) == ('planned', [1]), log.read_text()[-2000:]

    # 2. right after the version is registered (train() is still logging and evaluating)
    out = kill_when(args, lambda: "Created version '2'" in log.read_text(), 'the registration', log)
    assert 'resuming its training from' in out and 'epoch 1/3' not in out and 'epoch 3/3' in out, out[-2000:]   # it went on from epoch 1's checkpoint
    assert state() in ('planned', 'trained') and versions() == [1, 2], (state(), versions())

    # 3. while gating
    out = kill_when(args, lambda: state() == 'registered', 'the gate', log)
    assert 'already registered for manifest' in out and "Created version" not in out, out[-2000:]   # reused, not trained again
    time.sleep(.2); assert state() in ('registered', 'gated'), state()

    # 4. a clean start finishes the round
    out = run_learn(args).stdout
    m = read_manifest(rdir)
    assert state() == 'done' and versions() == [1, 2] and read_state(rdir)['version'] == 2, out[-2000:]
    runs = client.search_runs([client.get_experiment_by_name(f'{name}-learn').experiment_id], f"tags.{DIGEST_TAG} = '{m['digest']}'")
    assert len(runs) == 1 and runs[0].info.status == 'KILLED' and runs[0].info.run_id == client.get_model_version(name, '2').run_id   # resumed in the same run, then closed
    assert not list((rdir/'checkpoints').glob('*.pth'))

    # round 2 on the next photos: one version per round, each photo in exactly one round, the cursor at the last round's end
    feed(store, dishes, 10, 10)
    run_learn(args)
    assert versions() == [1, 2, 3]
    ms = [read_manifest(r) for r in round_dirs(store/'learner')]
    for m in ms: assert [int(v.version) for v in client.search_model_versions(f"name = '{name}' and tags.{DIGEST_TAG} = '{m['digest']}'")] == [m['round'] + 1]
    items = [sha for m in ms for sha, _ in m['items']]
    with FeedbackStore(store) as s:
        assert ms[-1]['store']['upto'] == s.head() == 40 and ms[0]['store']['upto'] == ms[1]['store']['after'] == 20
        assert len(items) == len(set(items)) and set(items) == {p.sha for p in s.labelled('all') if not held_out(p.sha)}
    print(f"\nkill -9 during training, after registration and while gating, then two clean starts: versions {versions()}, "
          f"{len(items)} photos trained once each, {sum(m['held_out']['count'] for m in ms[-1:])} held out, cursor {ms[-1]['store']['upto']}")


NB98 = Path(__file__).resolve().parents[1]/'nbs'/'98_teach_new_dishes.ipynb'

@needs_data
def test_teach_notebook_headless(tmp_path):
    "Item 5: nbs/98 (the Colab notebook) run headless with papermill and tiny settings: photos in, one round, the table out."
    import papermill as pm
    work, photos = tmp_path/'work', tmp_path/'photos'
    work.mkdir()
    data = original_subset(tmp_path/'orig', ['apple_pie', 'bibimbap'], 4, 3)
    train_champion(tmp_path/'champion', f"sqlite:///{work}/mlflow.db", data, 'nutrilearn-food101', epochs=1)   # what notebook 99 leaves behind
    for d in ('chai', 'momos'):
        (photos/d).mkdir(parents=True)
        for p in sorted((INDIAN/'train'/d).iterdir())[:6]: (photos/d/p.name).symlink_to(p)
    out = tmp_path/'executed.ipynb'
    pm.execute_notebook(str(NB98), str(out), cwd=str(tmp_path), kernel_name='python3', execution_timeout=900, progress_bar=False,
                        parameters=dict(photos_dir=str(photos), data_dir=str(data), work_dir=str(work), min_per_new_class=3, epochs=1,
                                        batch_size=8, num_workers=0, device='cpu'))
    outs = [o for c in json.loads(out.read_text())['cells'] for o in c.get('outputs', [])]
    assert not [o for o in outs if o['output_type'] == 'error']
    text = ''.join(''.join(o.get('text', '')) for o in outs)
    assert '12 photos labelled, 0 already in the store, 0 skipped' in text and 'chai' in text, text[-2000:]
    (row,) = round_rows(work/'feedback'/'learner')
    assert row['state'] == 'done' and row['version'] == 2 and row['new_photos'] + row['held_out'] == 12, row
    assert format_rounds([row]).splitlines()[1] in text                                   # the table, as the notebook printed it
    assert any('image/png' in o.get('data', {}) for o in outs)                            # and the chart
