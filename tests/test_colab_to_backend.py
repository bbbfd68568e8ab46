"""From Colab to the backend, as the README describes it: a run trained with the notebook's default store (a folder
holding `mlflow.db` + `mlartifacts/`, on Drive in Colab) is moved to another place; its artifacts and registered
model only resolve there after `reroot_mlflow_store`; the exported single file loads anywhere with
`Predictor.from_export`. Real CLI processes, real MLflow (sqlite), real food-101-mini photos."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest

MINI = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'food-101-mini'
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _needs_data():
    if not MINI.is_dir(): pytest.skip(f"food-101-mini not found at {MINI}")


def _run(args, cwd):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert r.returncode == 0, f"{args[0]} exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_moved_run_folder_resolves_after_reroot(tmp_path):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from nutrilearn_train.colab import reroot_mlflow_store
    from nutrilearn_train.inference import Predictor
    colab = tmp_path / 'content' / 'drive' / 'nutrilearn'   # the notebook's work_dir layout
    out = _run([str(BIN / 'nutrilearn-train'), '--data-dir', str(MINI), '--no-pretrained', '--epochs', '1', '--max-per-class', '2',
                '--batch-size', '8', '--num-workers', '0', '--device', 'cpu', '--output-dir', str(colab / 'outputs'),
                '--checkpoint-dir', str(colab / 'checkpoints'), '--tracking-uri', f"sqlite:///{colab}/mlflow.db"], tmp_path)
    run_id = out.split('MLflow run id: ')[1].split()[0]
    _run([str(BIN / 'nutrilearn-export'), '--model-dir', str(colab / 'outputs'), '--format', 'torchscript'], tmp_path)
    photo = sorted((MINI / 'food-101' / 'images').glob('*/*.jpg'))[-1]

    backend = tmp_path / 'backend' / 'nutrilearn'             # "download the folder from Drive"
    backend.parent.mkdir()
    shutil.move(str(colab), str(backend))
    uri = f"sqlite:///{backend}/mlflow.db"
    with pytest.raises(Exception) as before:                   # artifact paths still point into the old folder
        Predictor.from_registry('models:/nutrilearn-food101/1', tracking_uri=uri, device='cpu')
    assert isinstance(before.value, FileNotFoundError) and 'reroot_mlflow_store' in str(before.value), before.value   # the error says how to fix it

    assert reroot_mlflow_store(backend / 'mlflow.db', str(colab)) >= 3   # experiment, run, model version (+ logged model)
    p = Predictor.from_registry('models:/nutrilearn-food101/1', tracking_uri=uri, device='cpu')
    assert len(p.predict(photo, top_k=3)) == 3
    files = Path(download_artifacts(run_id=run_id, artifact_path='models/nutrilearn-food101/v1', tracking_uri=uri,
                                    dst_path=str(tmp_path / 'dl'))).iterdir()
    assert 'model_config.json' in {f.name for f in files}
    assert MlflowClient(uri).get_run(run_id).info.artifact_uri.startswith(str(backend))

    # the one-file path: copy the exported TorchScript (and the sha256 recorded beside it) anywhere; load it without the MLflow store
    exported, = (backend / 'outputs' / 'v1').glob('*.torchscript.pt')
    lone = tmp_path / 'server' / exported.name; lone.parent.mkdir(); shutil.copy(exported, lone)
    with pytest.raises(ValueError, match='no recorded digest'): Predictor.from_export(lone)   # without its digest it is not loaded
    shutil.copy(exported.with_name(exported.name + '.sha256'), lone.parent)
    shutil.rmtree(backend)
    top = Predictor.from_export(lone).predict(photo, top_k=3)
    assert [c for c, _ in top] == [c for c, _ in p.predict(photo, top_k=3)]
