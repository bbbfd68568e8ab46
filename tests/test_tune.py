"""`nutrilearn-tune` as real processes: a study killed with SIGKILL continues when the same command is rerun, and two
processes on one Optuna storage share the trials. Trials are tiny (8 generated JPEGs, one epoch, frozen mobilenet_v2)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import optuna   # the [tune] extra, in [dev]: a missing optuna fails here rather than skipping
BIN = Path(sys.executable).parent
FINISHED = ('COMPLETE', 'PRUNED')


def _data(root:Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ('a', 'b'):
        (root/'data'/c).mkdir(parents=True)
        for i in range(4): Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root/'data'/c/f'{i}.jpg')
    return root/'data'


def _cmd(d:Path, uri:str, trials:int, study:str) -> list:
    return [str(BIN/'nutrilearn-tune'), '--trials', str(trials), '--study-name', study, '--work-dir', str(d/'tune'),
            '--storage', f"sqlite:///{d}/optuna.db", '--data-dir', str(d/'data'), '--no-pretrained', '--epochs', '1',
            '--num-workers', '0', '--model-name', 'mobilenet_v2', '--freeze-layers', '-1', '--device', 'cpu',
            '--tracking-uri', uri, '--experiment-name', study]


def _env(): return {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_WAIT_POLICY': 'PASSIVE', 'OMP_NUM_THREADS': '1'}


def _trials(d:Path, study:str) -> list:
    try: return optuna.load_study(study_name=study, storage=f"sqlite:///{d}/optuna.db").get_trials(deepcopy=False)
    except KeyError: return []   # not created yet


def _wait(cond, timeout:float, what:str):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond(): return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _runs(uri:str, study:str) -> list:
    from mlflow import MlflowClient
    c = MlflowClient(uri)
    return c.search_runs([c.get_experiment_by_name(study).experiment_id])


def test_killed_study_continues(tmp_path):
    _data(tmp_path); uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = _cmd(tmp_path, uri, 3, 'killed')
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:   # kill -9 once one trial finished and the next one runs
        _wait(lambda: sum(t.state.name in FINISHED for t in _trials(tmp_path, 'killed')) >= 1
                      and any(t.state.name == 'RUNNING' for t in _trials(tmp_path, 'killed')), 300, 'a finished and a running trial')
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait(30)
    before = [t.state.name for t in _trials(tmp_path, 'killed')]
    assert before.count('RUNNING') == 1 and sum(s in FINISHED for s in before) in (1, 2), before
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{sum(s in FINISHED for s in before)} of 3 trials finished" in r.stdout, r.stdout
    after = _trials(tmp_path, 'killed')
    assert sum(t.state.name in FINISHED for t in after) == 3                     # continued to the asked number, no more
    best = tmp_path/'tune/killed/best_config.json'
    assert best.is_file() and 'nutrilearn-train --config' in r.stdout
    from nutrilearn_train.config import config_from_args, parse_arguments
    cfg = config_from_args(parse_arguments(['--config', str(best)]))             # what nutrilearn-train --config reads
    bt = optuna.load_study(study_name='killed', storage=f"sqlite:///{tmp_path}/optuna.db").best_trial
    assert cfg.learning_rate == bt.params['learning_rate'] and cfg.model_name == 'mobilenet_v2' and cfg.output_dir == 'outputs'
    runs = _runs(uri, 'killed')
    parents = [x for x in runs if x.data.tags.get('kind') == 'study']
    assert len(parents) == 1                                                      # the rerun resumed the same parent run
    pid = parents[0].info.run_id
    kids = [x for x in runs if x.data.tags.get('mlflow.parentRunId') == pid]
    # one child run per finished trial; the killed trial has one only if the kill came after its run started
    # (Optuna creates the trial a moment before train() opens the MLflow run)
    assert len(kids) in (len(after) - 1, len(after)), (len(kids), len(after))
    assert len([x for x in kids if x.info.status in ('FINISHED', 'KILLED')]) == sum(t.state.name in FINISHED for t in after)   # KILLED = pruned
    done = [x for x in kids if x.info.status == 'FINISHED']
    assert done and all('trial_value' in x.data.metrics and 'val_loss' in x.data.metrics and 'learning_rate' in x.data.params for x in done)
    assert all(x.data.tags['pruned'] in ('true', 'false') for x in kids if x.info.status != 'RUNNING')
    pt = parents[0].data
    assert pt.tags['n_complete'] == str(sum(t.state.name == 'COMPLETE' for t in after)) and 'best_value' in pt.metrics
    assert any(k.startswith('best_param.') for k in pt.tags)
    from mlflow import MlflowClient
    arts = {a.path for a in MlflowClient(uri).list_artifacts(pid, 'plots')}
    assert arts == {'plots/optimization_history.png', 'plots/parallel_coordinates.png'}, arts


def test_two_processes_share_one_study(tmp_path, mlflow_server):
    _data(tmp_path)
    cmd = _cmd(tmp_path, mlflow_server, 4, 'shared')
    kw = dict(cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    p1 = subprocess.Popen(cmd, **kw)
    try:
        _wait(lambda: len(_trials(tmp_path, 'shared')) >= 1, 300, 'the first trial')   # the study and its parent run exist
        p2 = subprocess.Popen(cmd, **kw)
        try: out2, _ = p2.communicate(timeout=600)
        finally:
            if p2.poll() is None: os.killpg(p2.pid, signal.SIGKILL)
        out1, _ = p1.communicate(timeout=600)
    finally:
        if p1.poll() is None: os.killpg(p1.pid, signal.SIGKILL)
    assert (p1.returncode, p2.returncode) == (0, 0), out1[-3000:] + out2[-3000:]
    ts = _trials(tmp_path, 'shared')
    n = sum(t.state.name in FINISHED for t in ts)
    assert 4 <= n <= 5, [t.state.name for t in ts]                  # the asked number (a process may start one more while the other ends)
    assert len({t.user_attrs['pid'] for t in ts}) == 2              # both processes ran trials
    runs = _runs(mlflow_server, 'shared')
    parents = [x for x in runs if x.data.tags.get('kind') == 'study']
    assert len(parents) == 1 and len([x for x in runs if x.data.tags.get('mlflow.parentRunId') == parents[0].info.run_id]) == len(ts)
