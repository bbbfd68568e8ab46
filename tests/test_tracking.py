"""Tracking: property 3 (every epoch's metrics are logged at step=epoch), the journal, and MLflowTracker against a
real `mlflow server`, including an outage at start, one mid-run, and `nutrilearn-replay`."""
import json, math, subprocess, sys, time, warnings
from pathlib import Path

import pytest, torch
from hypothesis import given, settings, strategies as st

from nutrilearn_train.tracking import (InMemoryTracker, MLflowTracker, Tracker, append_journal, log_model_artifact,
                                       log_training_metrics, read_journal, replay_journal, split_params)
from conftest import TcpProxy, free_port

METRICS = ['train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate']
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
epoch_rows = st.lists(st.tuples(finite, st.floats(0, 1), finite, st.floats(0, 1), st.floats(1e-8, 1)), min_size=1, max_size=30)


# --- property 3: every epoch's metrics are present, each at step=epoch -------------------------------------------

@settings(max_examples=100, deadline=None)
@given(rows=epoch_rows, start=st.integers(0, 5))
def test_property3_every_epoch_metric_logged_at_its_step(rows, start):
    t = InMemoryTracker(); t.start()
    for ep, row in enumerate(rows, start): log_training_metrics(ep, *row, tracker=t, epoch_time=1.0)
    t.end()
    steps = list(range(start, start + len(rows)))
    for i, key in enumerate(METRICS):
        assert t.metrics[key] == [(s, float(r[i])) for s, r in zip(steps, rows)], key
    assert [s for s, _ in t.metrics['epoch_time']] == steps


@settings(max_examples=100, deadline=None)
@given(old=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 3), max_size=6),
       new=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 3), max_size=6))
def test_split_params_partitions_new_params(old, new):
    existing = {k: str(v) for k, v in old.items()}
    to_log, changed = split_params(existing, new)
    assert set(to_log) == set(new) - set(existing)
    assert set(changed) == {k for k in set(new) & set(existing) if existing[k] != str(new[k])}
    assert all(v == str(new[k]) for k, v in {**to_log, **changed}.items())


@settings(max_examples=100, deadline=None)
@given(entries=st.lists(st.fixed_dictionaries({'op': st.sampled_from(['metrics', 'tags', 'params']),
                                               'step': st.integers(0, 10**6), 'x': st.floats(allow_nan=False),
                                               's': st.text(max_size=20)}), max_size=8))
def test_journal_round_trips(tmp_path_factory, entries):
    j = tmp_path_factory.mktemp('j') / 'journal.jsonl'
    written = [append_journal(j, e) for e in entries]
    assert read_journal(j) == written if entries else not j.exists()
    assert len({e['id'] for e in written}) == len(written)


def test_trackers_follow_the_protocol(tmp_path):
    assert isinstance(InMemoryTracker(), Tracker)
    assert isinstance(MLflowTracker(f"sqlite:///{tmp_path}/m.db", 'x', tmp_path / 'j.jsonl'), Tracker)


# --- a real sqlite store --------------------------------------------------------------------------------------

def test_sqlite_every_epoch_present(tmp_path):
    from mlflow import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = MLflowTracker(uri, 'prop3', tmp_path / 'journal.jsonl')
    rid = t.start()
    for ep in range(3): log_training_metrics(ep, 1.0 / (ep + 1), 0.1 * ep, 2.0 / (ep + 1), 0.2 * ep, 1e-3, tracker=t)
    t.end()
    c = MlflowClient(uri)
    for key in METRICS:
        assert [m.step for m in c.get_metric_history(rid, key)] == [0, 1, 2], key
    assert [m.value for m in c.get_metric_history(rid, 'val_acc')] == pytest.approx([0.0, 0.2, 0.4])
    assert not (tmp_path / 'journal.jsonl').exists()


# --- a real mlflow server -------------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0); return torch.nn.Sequential(torch.nn.Linear(4, 3))


def _backbone():
    "What training logs: a registered backbone (a journalled model is rebuilt from its name, never unpickled)."
    from nutrilearn_train.models import build_model
    torch.manual_seed(0); return build_model('mobilenet_v2', 3, pretrained=False)


def _version_folder(root: Path) -> Path:
    d = root / 'outputs' / 'v1'; d.mkdir(parents=True)
    (d / 'class_to_idx.json').write_text(json.dumps({'pizza': 0, 'ramen': 1, 'sushi': 2}))
    (d / 'model_config.json').write_text(json.dumps({'model_name': 'tiny', 'num_classes': 3}))
    return d


def _only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _assert_complete_run(client, run, epochs, model_name):
    "Params, every metric at every epoch, the artifacts, the registered model with its alias: all in this run."
    rid = run.info.run_id
    assert run.info.status == 'FINISHED'
    assert run.data.params == {'model_name': 'tiny', 'epochs': str(epochs), 'batch_size': '8'}
    assert run.data.tags['dataset'] == 'food-101-mini' and run.data.tags['model_version'] == '1'
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(rid, key)] == list(range(epochs)), key
    arts = sorted(a.path for a in client.list_artifacts(rid, 'models/tiny/v1'))
    assert arts == ['models/tiny/v1/class_to_idx.json', 'models/tiny/v1/model_config.json']
    mv = client.get_model_version_by_alias(model_name, 'champion')
    assert mv.run_id == rid
    return mv


def _log_epochs(t, epochs):
    for ep in epochs: log_training_metrics(ep, 1.0 / (ep + 1), 0.1 * ep, 1.5 / (ep + 1), 0.1 * ep, 1e-3, tracker=t)


def test_server_run_params_metrics_artifacts_model(mlflow_server, tmp_path):
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    t = MLflowTracker(mlflow_server, 'server-run', tmp_path / 'journal.jsonl')
    t.start(run_name='live')
    t.log_params({'model_name': 'tiny', 'epochs': 2, 'batch_size': 8}); t.set_tags({'dataset': 'food-101-mini'})
    _log_epochs(t, range(2))
    log_model_artifact(_version_folder(tmp_path), 'tiny', 1, tracker=t)
    model = _model()
    assert t.log_model(model, 'model', registered_model_name='tiny-live', alias='champion') == 1
    t.end()
    c = MlflowClient(mlflow_server)
    _assert_complete_run(c, _only_run(c, 'server-run'), 2, 'tiny-live')
    with _use_tracking_uri(mlflow_server): loaded = mlflow.pytorch.load_model('models:/tiny-live@champion')
    x = torch.randn(2, 4)
    with torch.no_grad(): assert torch.equal(loaded(x), model(x))
    assert not t.offline and not (tmp_path / 'journal.jsonl').exists()


def test_outage_at_start_and_mid_run_loses_nothing(mlflow_server, tmp_path):
    "Down at start (pending run), back (replayed, online), down mid-run (journalled), back at end(): one complete run."
    from mlflow import MlflowClient
    proxy = TcpProxy(int(mlflow_server.rsplit(':', 1)[1]))  # not started: its port refuses connections
    t = MLflowTracker(proxy.uri, 'outage', tmp_path / 'ck' / 'tracking_journal.jsonl', retry_interval=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        t0 = time.monotonic()
        pid = t.start(run_name='flaky')
        t.log_params({'model_name': 'tiny', 'epochs': 4, 'batch_size': 8}); t.set_tags({'dataset': 'food-101-mini'})
        _log_epochs(t, range(2))
        assert time.monotonic() - t0 < 20 and pid.startswith('pending-') and t.offline
        assert [e['op'] for e in read_journal(t.journal_path)] == ['start', 'params', 'tags', 'metrics', 'metrics']

        proxy.start(); time.sleep(2.1)                       # server back, retry due
        _log_epochs(t, [2])
        assert not t.offline and not t.run_id.startswith('pending-') and not t.journal_path.exists()

        proxy.stop(); t0 = time.monotonic()                  # server gone mid-run
        _log_epochs(t, [3])
        log_model_artifact(_version_folder(tmp_path), 'tiny', 1, tracker=t)
        assert t.log_model(_backbone(), 'model', registered_model_name='tiny-outage', alias='champion') is None
        assert time.monotonic() - t0 < 30 and t.offline
        assert [e['op'] for e in read_journal(t.journal_path)] == ['metrics', 'artifact', 'tags', 'model']

        proxy.start()
        t.end()                                              # reconnects at once and replays
    proxy.stop()
    assert sum('is unreachable since' in str(x.message) for x in w) == 2  # once per outage, not per call
    assert not any('still journalled' in str(x.message) for x in w)
    assert not t.journal_path.exists() and not Path(str(t.journal_path) + '.files').exists()
    c = MlflowClient(mlflow_server)
    run = _only_run(c, 'outage')
    assert run.info.run_id == t.run_id and run.info.run_name == 'flaky'
    _assert_complete_run(c, run, 4, 'tiny-outage')


def test_blackholed_server_call_is_bounded(tmp_path):
    "A server that accepts connections but never answers: start() gives up within the HTTP bounds, later calls are instant."
    import socket
    with socket.socket() as hole:
        hole.bind(('127.0.0.1', 0)); hole.listen(64)
        t = MLflowTracker(f"http://127.0.0.1:{hole.getsockname()[1]}", 'hole', tmp_path / 'j.jsonl', retry_interval=3600)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            t0 = time.monotonic(); t.start(); took = time.monotonic() - t0
            t1 = time.monotonic()
            for ep in range(10): log_training_metrics(ep, 1, 1, 1, 1, 1e-3, tracker=t)
            rest = time.monotonic() - t1
    assert took < 15, took
    assert rest < 1, rest
    assert len(read_journal(t.journal_path)) == 11


def test_replay_command_after_outage(mlflow_server, tmp_path):
    "A run that ended while the server was down leaves a journal; `nutrilearn-replay` sends it once it is back."
    from mlflow import MlflowClient
    port = free_port()
    t = MLflowTracker(f"http://127.0.0.1:{port}", 'replay-cli', tmp_path / 'journal.jsonl', retry_interval=3600)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        t0 = time.monotonic()
        t.start(); t.log_params({'model_name': 'tiny', 'epochs': 3, 'batch_size': 8})
        t.set_tags({'dataset': 'food-101-mini'}); _log_epochs(t, range(3))
        log_model_artifact(_version_folder(tmp_path), 'tiny', 1, tracker=t)
        t.log_model(_backbone(), 'model', registered_model_name='tiny-cli', alias='champion')
        t.end()
        took = time.monotonic() - t0
    assert took < 60, took                                   # a dozen calls against a dead server
    assert any('nutrilearn-replay --journal' in str(x.message) for x in w)
    assert len(read_journal(t.journal_path)) == 10

    cli = [str(Path(sys.executable).parent / 'nutrilearn-replay'), '--journal', str(t.journal_path), '--tracking-uri']
    proxy = TcpProxy(int(mlflow_server.rsplit(':', 1)[1]), port=port).start()   # the server is back on that port
    try:
        r = subprocess.run(cli + [proxy.uri], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert 'replayed 10 call(s)' in r.stdout, r.stdout
        again = subprocess.run(cli + [proxy.uri], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and 'nothing to replay' in again.stdout, again.stdout + again.stderr
    finally: proxy.stop()
    c = MlflowClient(mlflow_server)
    _assert_complete_run(c, _only_run(c, 'replay-cli'), 3, 'tiny-cli')


def test_replay_is_idempotent_when_interrupted(mlflow_server, tmp_path):
    "Entries already sent are never sent twice, even if the `.done` record of the last one was lost."
    from mlflow import MlflowClient
    j = tmp_path / 'journal.jsonl'
    append_journal(j, {'op': 'start', 'run_id': 'pending-x', 'experiment_name': 'idem', 'run_name': None})
    for ep in range(3): append_journal(j, {'op': 'metrics', 'run_id': 'pending-x', 'metrics': {'val_acc': ep / 10}, 'step': ep})
    lines = j.read_text()
    assert replay_journal(j, mlflow_server)['replayed'] == 4
    j.write_text(lines)                                      # as if the replay died before recording anything
    assert replay_journal(j, mlflow_server)['replayed'] == 4
    c = MlflowClient(mlflow_server)
    run = _only_run(c, 'idem')
    assert [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, 'val_acc')] == [(0, 0.0), (1, 0.1), (2, 0.2)]
