"""Integration tests of `nutrilearn-train` as a user runs it: a subprocess on the food-101-mini sample, a REAL
`mlflow server`, resume, a tracking-server outage with replay, and `kill -9` in the middle of training.

Each run trains mobilenet_v2 from scratch at 224 px on 2 images per class (10 train + 10 validation images)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from conftest import TcpProxy, free_port

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent
METRICS = ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate', 'epoch_time')
RUN_TIMEOUT = 400  # seconds for one CLI run; they take ~20-60 s


@pytest.fixture(autouse=True)
def need_data():
    if not MINI.is_dir(): pytest.skip(f"the food-101-mini sample is missing at {MINI}")


def cli_args(d:Path, tracking_uri:str, name:str, epochs:int, *extra) -> list:
    return [str(BIN/'nutrilearn-train'), '--data-dir', str(MINI), '--model-name', 'mobilenet_v2', '--no-pretrained',
            '--max-per-class', '2', '--num-workers', '0', '--batch-size', '8', '--device', 'cpu', '--epochs', str(epochs),
            '--checkpoint-dir', str(d/'ck'), '--output-dir', str(d/'out'), '--tracking-uri', tracking_uri,
            '--experiment-name', name, '--registered-model-name', name, '--seed', '7', '--promote', 'always', *extra]


def run_cli(args:list, cwd:Path) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def printed_run_id(stdout:str) -> str: return stdout.split('MLflow run id: ')[1].split()[0]


def history(client, run_id:str) -> dict:
    "`{metric: [(step, value), ...]}` of a run, sorted by step."
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in METRICS}


def comparable(h:dict) -> dict: return {k: v for k, v in h.items() if k != 'epoch_time'}


def test_real_server_then_resume_matches_a_straight_run(mlflow_server, tmp_path):
    "(a) a real server gets params, per-epoch metrics, artifacts and a registered version; (b) --resume last continues the same run."
    from mlflow import MlflowClient
    client, name, d = MlflowClient(mlflow_server), 'cli-server-resume', tmp_path/'served'
    d.mkdir()
    r = run_cli(cli_args(d, mlflow_server, name, 2), d)
    run_id = printed_run_id(r.stdout)
    assert f"artifacts: {(d/'out/v1').resolve()}" in r.stdout and r.stdout.count('epoch ') >= 2
    run = client.get_run(run_id)
    assert run.info.status == 'FINISHED'
    assert {k: run.data.params[k] for k in ('model_name', 'learning_rate', 'batch_size', 'epochs', 'optimizer', 'scheduler')} == \
           {'model_name': 'mobilenet_v2', 'learning_rate': '0.001', 'batch_size': '8', 'epochs': '2', 'optimizer': 'adam', 'scheduler': 'reduce_on_plateau'}
    assert run.data.tags['backbone'] == 'mobilenet_v2' and run.data.tags['version'] == 'v1' and 'training_time' in run.data.tags
    h2 = history(client, run_id)
    assert all([s for s, _ in h2[k]] == [1, 2] for k in METRICS), h2
    arts = sorted(a.path for a in client.list_artifacts(run_id, f'models/{name}/v1'))   # log_model_artifact: models/<name>/vN
    assert arts == [f'models/{name}/v1/{f}' for f in ('class_to_idx.json', 'food_model_v1.pth', 'model_config.json')], arts
    assert run.data.tags['model_version'] == '1' and run.data.tags['reload_check'] == 'ok'
    reloaded = [l for l in r.stdout.splitlines() if l.startswith('reloaded v1 from disk: ')]   # the design's last step
    assert len(reloaded) == 1 and reloaded[0].count('%') == 3 and '(true: ' in reloaded[0], r.stdout[-2000:]
    mv = client.get_model_version_by_alias(name, 'champion')
    assert (mv.version, mv.run_id) == ('1', run_id)
    mc = json.loads((d/'out/v1/model_config.json').read_text())
    assert (mc['mlflow_run_id'], mc['registered_model_name'], mc['registered_model_version'], mc['num_classes']) == (run_id, name, 1, 10)

    r = run_cli(cli_args(d, mlflow_server, name, 4, '--resume', 'last'), d)
    assert printed_run_id(r.stdout) == run_id                       # the SAME run
    assert 'epoch 3/4' in r.stdout and 'epoch 1/4' not in r.stdout    # it really resumed
    h4 = history(client, run_id)
    assert all([s for s, _ in h4[k]] == [1, 2, 3, 4] for k in METRICS), h4
    assert comparable(h4) == {k: v + h4[k][2:] for k, v in comparable(h2).items()}
    assert client.get_run(run_id).info.status == 'FINISHED'
    assert client.get_model_version_by_alias(name, 'champion').version == '2'
    assert len(client.search_runs([client.get_experiment_by_name(name).experiment_id])) == 1

    s = tmp_path/'straight'; s.mkdir()
    r = run_cli(cli_args(s, f"sqlite:///{s}/mlflow.db", name, 4), s)
    straight = history(MlflowClient(f"sqlite:///{s}/mlflow.db"), printed_run_id(r.stdout))
    assert comparable(straight) == comparable(h4)                    # 2 + resume to 4 == 4 straight, exactly


def test_outage_journals_then_replay_delivers_everything(mlflow_server, tmp_path):
    "(c) tracking URI on a closed port: training completes in bounded time and journals; replay after the server is back."
    from mlflow import MlflowClient
    name, port = 'cli-outage', free_port()
    proxy = TcpProxy(int(mlflow_server.rsplit(':', 1)[1]), port)      # not started yet: the port is closed
    t0 = time.monotonic()
    r = run_cli(cli_args(tmp_path, proxy.uri, name, 2), tmp_path)
    elapsed = time.monotonic() - t0
    assert elapsed < 300, f"training against a dead server took {elapsed:.0f}s"
    journal = tmp_path/'ck/mlflow_journal.jsonl'
    assert journal.is_file() and 'unreachable' in r.stderr, r.stderr[-2000:]
    ops = [json.loads(l)['op'] for l in journal.read_text().splitlines() if l.strip()]
    recs = [json.loads(l) for l in journal.read_text().splitlines() if l.strip()]
    logged = [set(r['metrics']) for r in recs if r['op'] == 'metrics']   # 2 epochs, the calibration on validation, the test split
    assert len(logged) == 4 and sum('val_acc' in m for m in logged) == 2 and {'temperature', 'uncertainty_threshold'} <= logged[2], logged
    assert any(k.startswith('test_') for k in logged[3]), logged[3]
    assert 'params' in ops and ops.count('artifact') == 11 and 'model' in ops and 'dataset' in ops, ops   # 11: with calibration's 2 files
    names = {Path(json.loads(l).get('path') or json.loads(l).get('file') or '').name for l in journal.read_text().splitlines() if l.strip()}
    assert {'misclassified.png', 'top_losses.png', 'confusion_matrix.png', 'calibration.json', 'reliability_diagram.png'} <= names, names   # the evaluation's pictures are journalled too
    proxy.start()
    try:
        rp = subprocess.run([str(BIN/'nutrilearn-replay'), '--journal', str(journal), '--tracking-uri', proxy.uri],
                            capture_output=True, text=True, timeout=300)
        assert rp.returncode == 0, rp.stdout + rp.stderr
        client = MlflowClient(proxy.uri)
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert len(runs) == 1
        run_id = runs[0].info.run_id
        assert all([s for s, _ in history(client, run_id)[k]] == [1, 2] for k in METRICS)
        assert runs[0].data.params['model_name'] == 'mobilenet_v2' and runs[0].info.status == 'FINISHED'
        assert len(client.list_artifacts(run_id, f'models/{name}/v1')) == 3   # log_model_artifact: the weights and both JSON files
        assert client.get_model_version_by_alias(name, 'challenger').run_id == run_id   # promotion waits for nutrilearn-promote
    finally: proxy.stop()


def test_kill_9_during_training_then_resume(tmp_path):
    "(d) SIGKILL after the first checkpoint, then --resume last finishes the run (one MLflow run, every epoch)."
    from mlflow import MlflowClient
    uri, name = f"sqlite:///{tmp_path}/mlflow.db", 'cli-kill'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    with open(tmp_path/'killed.log', 'w') as log:
        p = subprocess.Popen(cli_args(tmp_path, uri, name, 3), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (tmp_path/'ck/last.pth').exists():
            assert p.poll() is None, (tmp_path/'killed.log').read_text()[-3000:]
            assert time.monotonic() < deadline, 'no checkpoint appeared'
            time.sleep(0.2)
    finally:
        os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    r = run_cli(cli_args(tmp_path, uri, name, 3, '--resume', 'last'), tmp_path)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == printed_run_id(r.stdout) and runs[0].info.status == 'FINISHED'
    for k, pts in comparable(history(client, runs[0].info.run_id)).items():
        assert sorted({s for s, _ in pts}) == [1, 2, 3], (k, pts)
        assert len({(s, v) for s, v in pts}) == 3, (k, pts)            # an epoch logged twice (killed before its checkpoint) repeats exactly
    assert (tmp_path/'out/v1/model_config.json').is_file()


def test_bad_arguments_and_data_give_one_line_errors(tmp_path):
    "Bad values and a missing data folder: a one-line message on stderr, exit status != 0, no traceback."
    base = [str(BIN/'nutrilearn-train'), '--no-pretrained', '--checkpoint-dir', str(tmp_path/'ck'), '--output-dir', str(tmp_path/'out'),
            '--tracking-uri', f'sqlite:///{tmp_path}/mlflow.db']
    for extra, msg, code in [(['--data-dir', str(tmp_path/'missing')], 'No dataset found in', 1),
                             (['--data-dir', str(MINI), '--learning-rate', '-1'], 'learning_rate must be in (0, 10)', 1),
                             (['--data-dir', str(MINI), '--resume', 'last'], '--resume last: no checkpoint at', 1),
                             (['--model-name', 'vgg'], "invalid choice: 'vgg'", 2)]:
        r = subprocess.run(base + extra, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == code and msg in r.stderr and 'Traceback' not in r.stderr, (extra, r.returncode, r.stderr)
    r = subprocess.run([sys.executable, '-m', 'nutrilearn_train.train', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '--resume' in r.stdout


def test_fresh_run_never_overwrites_an_earlier_runs_checkpoint(tmp_path):
    "A fresh run (no --resume) in a checkpoint folder holding last.pth refuses to start, says how to go on, and leaves it as it was."
    (tmp_path/'ck').mkdir(); (tmp_path/'ck/last.pth').write_bytes(b'an earlier run')
    r = subprocess.run(cli_args(tmp_path, f'sqlite:///{tmp_path}/mlflow.db', 'cli-fresh', 1), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"nutrilearn-train: error: the checkpoint folder {tmp_path/'ck'} already holds last.pth from an earlier run, which a "
                                "fresh run would overwrite; continue that run with `--resume last`, or start a new one with another `--checkpoint-dir`")
    assert (tmp_path/'ck/last.pth').read_bytes() == b'an earlier run' and not (tmp_path/'out').exists()
