"""Issue 21, trust boundaries: one test per attack, each written to fail on the code before the fix (f3a823f).

Real parts where the attack uses them: the pyfunc loaded by MLflow's own models-from-code loader and answered by its
scoring function (what `mlflow models serve` runs per request), `nutrilearn-evaluate` as a process, real SQLite
stores, a `file://` download through urllib. Everything is offline and small (32-pixel models, tiny images)."""
import base64, configparser, csv, hashlib, importlib.util, io, json, os, re, shutil, sqlite3, struct, subprocess, sys, zlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASSES = ['a', 'b', 'c']


def _jpeg(colour='red', size=(40, 30), **kw) -> bytes:
    b = io.BytesIO(); Image.new('RGB', size, colour).save(b, 'JPEG', **kw); return b.getvalue()


def _png16_zeros(side:int) -> bytes:
    "An all-zero 16-bit greyscale PNG, compressed row by row: ≈ 170 KB for 9400 x 9400 (88.4 Mpx)."
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    z, row = zlib.compressobj(9), bytes(1 + 2 * side)
    idat = b''.join(z.compress(row) for _ in range(side)) + z.flush()
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 16, 0, 0, 0, 0))
            + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def _tiny_model_dir(out:Path, classes=CLASSES, seed=0, **extra) -> Path:
    "An untrained 32-pixel mobilenet_v2 saved as training saves it; `extra` keys go into model_config.json."
    from nutrilearn_train.config import TrainingConfig, config_to_dict
    from nutrilearn_train.models import build_model
    from nutrilearn_train.persistence import save_model_artifacts
    torch.manual_seed(seed)
    cfg = {**config_to_dict(TrainingConfig(num_classes=len(classes), pretrained=False, tracking_uri=extra.pop('tracking_uri', None) or
                                           'sqlite:////nonexistent/mlflow.db')), 'image_size': 32}
    return save_model_artifacts(build_model('mobilenet_v2', len(classes), pretrained=False), {c: i for i, c in enumerate(classes)},
                                cfg, output_dir=out, extra=extra or None)


# ---------------------------------------------------------------- 1: the served model checks its weights

@pytest.fixture(scope='module')
def logged_pyfunc(tmp_path_factory):
    "The serving pyfunc saved the way tracking logs it (models from code: MLflow stores and later runs serving.py)."
    import mlflow.pyfunc
    from nutrilearn_train.serving import pyfunc_artifacts, serving_signature
    d = tmp_path_factory.mktemp('pyfunc')
    _tiny_model_dir(d/'out')
    code = importlib.util.find_spec('nutrilearn_train.serving').origin
    mlflow.pyfunc.save_model(str(d/'model'), python_model=code, artifacts=pyfunc_artifacts(d/'out'), signature=serving_signature(),
                             pip_requirements=[])
    return d/'model'


def _load(path):
    import mlflow.pyfunc
    return mlflow.pyfunc.load_model(str(path))


def test_1_served_model_refuses_weights_swapped_in_the_store(logged_pyfunc, tmp_path):
    "Weights replaced in a registered version's artifacts (same architecture, other values) are refused when MLflow loads it."
    from nutrilearn_train.models import build_model
    model = shutil.copytree(logged_pyfunc, tmp_path/'model')
    weights, = model.rglob('food_model_v1.pth')
    torch.manual_seed(123); torch.save(build_model('mobilenet_v2', len(CLASSES), pretrained=False).state_dict(), weights)
    with pytest.raises(Exception, match='does not match the weights_sha256 recorded'): _load(model)


# ---------------------------------------------------------------- 2: image and request size limits

def test_2_huge_16bit_png_is_refused_from_its_header_before_decoding():
    "The 170 KB all-zero 16-bit 9400 x 9400 PNG (1.2 GB and seconds to decode and convert) is refused without decoding a pixel."
    from PIL import ImageFile
    from nutrilearn_train.data import BadImageError, load_image
    png = _png16_zeros(9400)
    assert len(png) < 200_000
    real_load = ImageFile.ImageFile.load
    with mock.patch.object(ImageFile.ImageFile, 'load', autospec=True, side_effect=real_load) as decode:
        with pytest.raises(BadImageError, match=r'9400x9400 = 88360000 pixels exceeds max_pixels='): load_image(png)
    assert decode.call_count == 0


def test_2_a_200_megapixel_phone_jpeg_is_drafted_not_refused(tmp_path):
    "A real camera's largest photo (16320 x 12240, above PIL's own limit) is usable: decoded at 1/2 scale, within the limit."
    from nutrilearn_train.data import MAX_IMAGE_PIXELS, check_image
    b = bytearray(_jpeg(size=(64, 48)))
    i = next(i for i in range(len(b) - 1) if b[i] == 0xFF and b[i + 1] == 0xC0)
    b[i + 5:i + 9] = struct.pack('>HH', 12240, 16320)   # the frame header claims the phone's size
    (tmp_path/'phone.jpg').write_bytes(bytes(b))
    assert 16320 * 12240 > 2 * 89_478_485 and (16320 // 2) * (12240 // 2) <= MAX_IMAGE_PIXELS
    assert check_image(tmp_path/'phone.jpg') is None


def _invoke(model, body:dict):
    "What `mlflow models serve` does with one POST /invocations body: the response, or the MlflowException it turns into a 400."
    from mlflow.pyfunc import scoring_server
    return scoring_server.invocations(json.dumps(body), 'application/json', model, model.metadata.get_input_schema())


def _body(rows, **params) -> dict:
    return {'dataframe_split': {'columns': ['image'], 'data': [[r] for r in rows]}, **({'params': params} if params else {})}


def test_2_a_request_with_too_many_images_is_refused_before_decoding(logged_pyfunc):
    from mlflow.exceptions import MlflowException
    model, photo, n = _load(logged_pyfunc), base64.b64encode(_jpeg()).decode(), 65   # one over the default max_images (64)
    with mock.patch('nutrilearn_train.data.load_image') as decode, pytest.raises(MlflowException) as e:
        _invoke(model, _body([photo] * n))
    assert e.value.error_code == 'INVALID_PARAMETER_VALUE' and f'holds {n} images, more than max_images' in e.value.message
    decode.assert_not_called()


def test_2_request_bytes_limit_comes_from_the_server_environment(logged_pyfunc, monkeypatch):
    from mlflow.exceptions import MlflowException
    monkeypatch.setenv('NUTRILEARN_MAX_REQUEST_BYTES', '10000')
    model = _load(logged_pyfunc)
    ok = _invoke(model, _body([base64.b64encode(_jpeg()).decode()]))
    assert ok.status == 200
    big = base64.b64encode(_jpeg(size=(600, 400), quality=100, subsampling=0) + b'\0' * 20_000).decode()
    with pytest.raises(MlflowException, match='more than max_request_bytes=10000'): _invoke(model, _body([big]))


# ---------------------------------------------------------------- 3: torch.load(weights_only=True) is only a boundary from torch 2.6

def test_3_requirements_exclude_torch_versions_where_weights_only_can_run_code():
    "CVE-2025-32434: torch.load(weights_only=True) could still execute code before torch 2.6 (torchvision 0.21 goes with it)."
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    reqs = dict(re.fullmatch(r'([A-Za-z0-9_.-]+)(.*)', r).groups() for r in cfg['DEFAULT']['requirements'].split())
    floor = lambda spec: tuple(int(x) for x in re.fullmatch(r'>=(\d+)\.(\d+)(?:\.\d+)?', spec).groups())
    assert floor(reqs['torch']) >= (2, 6), reqs['torch']
    assert floor(reqs['torchvision']) >= (0, 21), reqs['torchvision']


# ---------------------------------------------------------------- 5 and 13: nutrilearn-evaluate and the folder it is given

@pytest.fixture
def store_with_failed_run(tmp_path):
    "A sqlite store holding a training run that FAILED at a known time, and a model folder that names that store and run."
    import mlflow
    uri = f"sqlite:///{tmp_path}/victim.db"
    c = mlflow.MlflowClient(uri)
    run = c.create_run(c.create_experiment('victim')).info.run_id
    c.set_terminated(run, 'FAILED', end_time=1_700_000_000_000)
    vdir = _tiny_model_dir(tmp_path/'out', ['a', 'b'], tracking_uri=uri, mlflow_run_id=run)
    for split, n in (('train', 3), ('test', 2)):
        for cls, colour in (('a', 'red'), ('b', 'blue')):
            (tmp_path/'data'/split/cls).mkdir(parents=True)
            for i in range(n): Image.new('RGB', (40, 36), colour).save(tmp_path/'data'/split/cls/f'{i}.jpg')
    return uri, run, vdir, tmp_path/'data'


def _evaluate(*args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'MLFLOW_TRACKING_URI'}
    return subprocess.run([str(BIN/'nutrilearn-evaluate'), *map(str, args), '--num-workers', '0', '--device', 'cpu'], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**env, 'PYTHONWARNINGS': 'ignore'})


def test_5_evaluate_never_logs_to_the_store_a_model_folder_names(store_with_failed_run, tmp_path):
    "A model folder picks neither where nutrilearn-evaluate connects nor whose run it marks FINISHED."
    import mlflow
    uri, run, vdir, data = store_with_failed_run
    r = _evaluate('--model-dir', vdir, '--data-dir', data, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'mlflow: not logged; pass --tracking-uri' in r.stdout, r.stdout
    got = mlflow.MlflowClient(uri).get_run(run)
    assert (got.info.status, got.info.end_time, got.data.metrics) == ('FAILED', 1_700_000_000_000, {})


def test_5_evaluate_adds_to_the_named_store_without_ending_the_run(store_with_failed_run, tmp_path):
    import mlflow
    uri, run, vdir, data = store_with_failed_run
    r = _evaluate('--model-dir', vdir, '--data-dir', data, '--tracking-uri', uri, cwd=tmp_path)
    assert r.returncode == 0 and f'to run {run}' in r.stdout, r.stdout + r.stderr[-2000:]
    got = mlflow.MlflowClient(uri).get_run(run)
    assert got.data.metrics['test_samples'] == 4
    assert (got.info.status, got.info.end_time) == ('FAILED', 1_700_000_000_000)


def test_13_evaluate_never_overwrites_the_training_time_evaluation(store_with_failed_run, tmp_path):
    uri, run, vdir, data = store_with_failed_run
    (vdir/'evaluation.json').write_text('{"written by": "training"}\n')
    r = _evaluate('--model-dir', vdir, '--data-dir', data, '--no-mlflow', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((vdir/'evaluation.json').read_text()) == {'written by': 'training'}
    assert json.loads((vdir/'evaluations/test_1/evaluation.json').read_text())['total_samples'] == 4
    again = _evaluate('--model-dir', vdir, '--data-dir', data, '--no-mlflow', '--output-dir', vdir, cwd=tmp_path)
    assert again.returncode == 1 and 'already holds evaluation.json' in again.stderr, again.stderr[-2000:]
    assert json.loads((vdir/'evaluation.json').read_text()) == {'written by': 'training'}


def test_13_weights_file_cannot_point_outside_the_model_folder(tmp_path):
    "A model_config.json naming someone else's file (absolute, or ../) is refused, not loaded."
    from nutrilearn_train.evaluate import load_evaluation_model
    other = _tiny_model_dir(tmp_path/'other', seed=1)
    vdir = _tiny_model_dir(tmp_path/'out')
    mc = json.loads((vdir/'model_config.json').read_text())
    for bad in (str(other/'food_model_v1.pth'), '../../other/v1/food_model_v1.pth'):
        (vdir/'model_config.json').write_text(json.dumps({**mc, 'weights_file': bad, 'weights_sha256': None}))
        with pytest.raises(ValueError, match='must be a file name inside'): load_evaluation_model(vdir)


# ---------------------------------------------------------------- 8: only photo formats reach a decoder

def test_8_eps_never_reaches_ghostscript(tmp_path):
    "PIL's EPS plugin hands the file to Ghostscript on load; a file that claims to be a photo must not get there."
    from nutrilearn_train.data import BadImageError, check_image, load_image
    eps = b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n'
    (tmp_path/'photo.jpg').write_bytes(eps)
    with mock.patch('PIL.EpsImagePlugin.Ghostscript', side_effect=AssertionError('Ghostscript ran')) as gs:
        with pytest.raises(BadImageError, match='not a recognised image format'): load_image(tmp_path/'photo.jpg')
        assert check_image(tmp_path/'photo.jpg', full=True).startswith('not a recognised image format')
        gs.assert_not_called()


# ---------------------------------------------------------------- 9: re-rooting the MLflow store

def _store(db:Path, root:str):
    with sqlite3.connect(db) as con:
        con.execute('CREATE TABLE experiments (experiment_id INTEGER, artifact_location TEXT)')
        con.execute('CREATE TABLE runs (run_uuid TEXT, artifact_uri TEXT)')
        con.execute("INSERT INTO experiments VALUES (1, ?), (2, '/srv/shared/other')", (f'{root}/mlartifacts/1',))
        con.execute('INSERT INTO runs VALUES (?, ?)', ('r', f'file://{root}/mlartifacts/1/r/artifacts'))
    con.close()


def _rows(db:Path) -> list:
    con = sqlite3.connect(db)
    try: return con.execute('SELECT * FROM experiments').fetchall() + con.execute('SELECT * FROM runs').fetchall()
    finally: con.close()


def test_9_reroot_refuses_root_slash_and_leaves_the_store_alone(tmp_path):
    "old_root '/' matched every absolute path and prefixed the new folder to all of them, other stores' paths included."
    from nutrilearn_train.colab import reroot_mlflow_store
    db = tmp_path/'mlflow.db'; _store(db, '/content/drive/MyDrive/nutrilearn')
    before = _rows(db)
    with pytest.raises(ValueError, match="other than '/'"): reroot_mlflow_store(db, '/')
    assert _rows(db) == before


def test_9_reroot_into_a_subfolder_cannot_be_applied_twice(tmp_path):
    "A store moved into a folder under its old root: running the cell twice rewrote the rewritten paths (…/copy/copy/…)."
    from nutrilearn_train.colab import reroot_mlflow_store
    old = tmp_path/'nl'; db = old/'copy'/'mlflow.db'; db.parent.mkdir(parents=True); _store(db, str(old))
    before = _rows(db)
    for _ in range(2):
        with pytest.raises(ValueError, match='are nested'): reroot_mlflow_store(db, str(old))
    assert _rows(db) == before


def test_9_reroot_backs_the_store_up_before_editing_it(tmp_path):
    from nutrilearn_train.colab import reroot_mlflow_store
    db = tmp_path/'moved'/'mlflow.db'; db.parent.mkdir(); _store(db, '/content/drive/MyDrive/nutrilearn')
    before = _rows(db)
    assert reroot_mlflow_store(db, '/content/drive/MyDrive/nutrilearn') == 2
    bak, = db.parent.glob('mlflow.db.bak-*')
    assert _rows(bak) == before and _rows(db) != before


# ---------------------------------------------------------------- 12: serving input

def test_12_top_k_outside_1_to_the_class_count_or_null_is_a_clear_400(logged_pyfunc):
    from mlflow.exceptions import MlflowException
    model, photo = _load(logged_pyfunc), base64.b64encode(_jpeg()).decode()
    for k in (0, -1, len(CLASSES) + 1, None):
        with pytest.raises(MlflowException) as e: _invoke(model, _body([photo], top_k=k))
        assert e.value.error_code == 'INVALID_PARAMETER_VALUE', (k, e.value.error_code)
        assert f'top_k must be an integer from 1 to {len(CLASSES)}' in e.value.message, (k, e.value.message)


def test_12_one_bad_image_gets_its_own_error_and_the_rest_are_answered(logged_pyfunc):
    "Lenient base64 ('Y*W*I=' decoded as b'ab'), bytes that are no image and a null each get an error; the photo an answer."
    model, photo = _load(logged_pyfunc), base64.b64encode(_jpeg()).decode()
    r = _invoke(model, _body([photo, 'Y*W*I=', base64.b64encode(b'not an image').decode(), None, photo], top_k=2))
    got = json.loads(r.response)['predictions']
    assert r.status == 200 and len(got) == 5
    assert [len(g['classes']) for g in got] == [2, 0, 0, 0, 2] and got[0]['classes'] == got[4]['classes']
    assert got[0]['error'] is None and got[1]['error'].startswith('image 1: not valid base64'), got
    assert got[2]['error'].startswith('image 2: not a recognised image format') and got[3]['error'] == 'image 3: expected a base64 string, got null'


# ---------------------------------------------------------------- 13: download, install, spreadsheet

def test_13_a_download_that_is_not_the_published_food101_archive_is_deleted(tmp_path):
    from nutrilearn_train.colab import fetch_archive
    fake = tmp_path/'fake.tar.gz'; fake.write_bytes(b'not food-101' * 1000)
    dest = tmp_path/'drive'/'food-101.tar.gz'
    with pytest.raises(ValueError, match='not the published 85eeb15f3717b99a5da872d97d918f87'): fetch_archive(dest, fake.as_uri())
    assert list(dest.parent.iterdir()) == []
    assert fetch_archive(dest, fake.as_uri(), md5=hashlib.md5(fake.read_bytes()).hexdigest()).read_bytes() == fake.read_bytes()


def test_13_colab_installs_a_pinned_release_not_whatever_is_newest():
    nb = json.loads((ROOT/'nbs/99_run_training.ipynb').read_text())
    src = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and '%pip install {PACKAGE}' in ''.join(c['source']))
    package = re.search(r"^PACKAGE = '([^']+)'", src, re.M).group(1)
    ref = re.fullmatch(r'git\+https://github\.com/nutrilearn/nutrilearn_train@(.+)', package)
    assert ref, f"PACKAGE {package!r} names no ref: pip would install whatever the default branch holds"
    assert re.fullmatch(r'v?\d+\.\d+\.\d+|[0-9a-f]{40}', ref.group(1)), f"{ref.group(1)!r} is a moving branch, not a release tag or commit"


def test_13_mining_csv_names_are_text_not_spreadsheet_formulas(tmp_path):
    "Photo file names and class names are chosen by whoever supplies them; none may become a live formula."
    from nutrilearn_train.mining import main
    vdir = _tiny_model_dir(tmp_path/'out', ['=1+1', 'pizza'])
    photos = tmp_path/'photos'; photos.mkdir()
    names = ['=HYPERLINK("x.example","ok").jpg', '+cmd.jpg', '-2.jpg', '@SUM(A1).jpg', 'plain.jpg']
    for n in names: (photos/n).write_bytes(_jpeg())
    cwd = os.getcwd(); os.chdir(photos)   # `--images .`: the CSV holds the bare file names
    try: assert main(['--model-dir', str(vdir), '--images', '.', '--output-dir', str(tmp_path/'m'), '--no-progress', '--device', 'cpu']) == 0
    finally: os.chdir(cwd)
    rows = list(csv.DictReader(open(tmp_path/'m/uncertain.csv', newline='')))
    cells = [v for r in rows for v in r.values()]
    assert not [v for v in cells if v[:1] in ('=', '+', '@') or (v[:1] == '-' and not v[1:].replace('.', '').isdigit())], cells
    assert sorted(r['image'] for r in rows) == sorted("'" + n if n[0] in '=+-@' else n for n in names)


# ---------------------------------------------------------------- 4: credentials in the tracking URI never leak

SENTINEL = 'S3ntinel-pw-4f9a1c'
MINI = ROOT.parent/'shared/data/food-101-mini'


def _grep_tree(root:Path, needle:str) -> list:
    "Files under `root` whose bytes contain `needle` (zip/pt archives included: they store the strings uncompressed)."
    return [p for p in root.rglob('*') if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.parametrize('server', ['up', 'down'])
def test_4_a_password_in_the_tracking_uri_is_never_written_or_printed(mlflow_server, tmp_path, server):
    "The real CLI with `http://user:SENTINEL@host`: outputs, checkpoints, journal, MLflow params/tags and stdout/stderr never hold it."
    if not MINI.is_dir(): pytest.skip(f"the food-101-mini sample is missing at {MINI}")
    from mlflow import MlflowClient
    port = mlflow_server.rsplit(':', 1)[1] if server == 'up' else '1'
    uri = f"http://nutri:{SENTINEL}@127.0.0.1:{port}"
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'MLFLOW_HTTP_REQUEST_MAX_RETRIES': '0', 'MLFLOW_HTTP_REQUEST_TIMEOUT': '3'}
    r = subprocess.run([str(BIN/'nutrilearn-train'), '--data-dir', str(MINI), '--no-pretrained', '--max-per-class', '2', '--epochs', '1',
                        '--batch-size', '4', '--num-workers', '0', '--device', 'cpu', '--freeze-layers', '-1', '--tracking-uri', uri,
                        '--experiment-name', f'creds-{server}', '--checkpoint-dir', str(tmp_path/'ck'), '--output-dir', str(tmp_path/'out')],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert SENTINEL not in r.stdout and SENTINEL not in r.stderr, (r.stdout[-2000:], r.stderr[-2000:])
    assert 'nutri:' not in r.stdout + r.stderr and '***@127.0.0.1' in r.stdout   # redacted where it is printed
    assert _grep_tree(tmp_path, SENTINEL) == []          # outputs/, ck/ (checkpoints, journal and its files) and anything else
    if server == 'down':
        assert (tmp_path/'ck'/'mlflow_journal.jsonl').is_file()   # the outage really was journalled, without the password
    else:
        c = MlflowClient(mlflow_server)
        run = c.get_run(r.stdout.split('MLflow run id: ')[1].split()[0])
        assert run.data.params['tracking_uri'] == f"http://***@127.0.0.1:{port}"
        assert not any(SENTINEL in v for d in (run.data.params, run.data.tags) for v in d.values())
        assert _grep_tree(mlflow_server_root(mlflow_server), SENTINEL) == []   # nor anything the server stored


def mlflow_server_root(uri:str) -> Path:
    "The folder of the session's mlflow server (its sqlite store and artifacts), found from its process."
    import psutil
    port = uri.rsplit(':', 1)[1]
    for p in psutil.process_iter(['cmdline']):
        cmd = p.info['cmdline'] or []
        if 'server' in cmd and '--port' in cmd and cmd[cmd.index('--port') + 1] == port:
            return Path(cmd[cmd.index('--artifacts-destination') + 1]).parent
    raise AssertionError(f"no mlflow server process on port {port}")


# ---------------------------------------------------------------- 6: a crafted journal stays in its folder; replays take turns

def _journal_with(tmp_path:Path, *entries) -> Path:
    from nutrilearn_train.journal import append_journal
    j = tmp_path/'ck'/'mlflow_journal.jsonl'
    append_journal(j, {'op': 'start', 'run_id': 'pending-x', 'experiment_name': 'crafted', 'run_name': 'crafted'})
    for e in entries: append_journal(j, {'run_id': 'pending-x', **e})
    return j


def test_6_a_journal_entry_cannot_upload_or_delete_files_outside_its_folder(tmp_path):
    from mlflow import MlflowClient
    secret = tmp_path/'home'/'id_rsa'; secret.parent.mkdir(); secret.write_text('PRIVATE KEY')
    spool = tmp_path/'ck'/'mlflow_journal.jsonl.files'; (spool/'a').mkdir(parents=True)
    (spool/'a'/'link.txt').symlink_to(secret)
    j = _journal_with(tmp_path, {'op': 'artifact', 'path': str(spool/'a'/'..'/'..'/'..'/'home'/'id_rsa'), 'artifact_path': 'dotdot'},
                      {'op': 'artifact', 'path': str(secret), 'artifact_path': 'absolute'},
                      {'op': 'artifact', 'path': str(spool/'a'/'link.txt'), 'artifact_path': 'symlink'})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = subprocess.run([str(BIN/'nutrilearn-replay'), '--journal', str(j), '--tracking-uri', uri], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and '3 rejected' in r.stdout, (r.stdout, r.stderr[-2000:])
    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name('crafted').experiment_id])[0]
    assert c.list_artifacts(run.info.run_id) == []                     # nothing was uploaded
    assert secret.read_text() == 'PRIVATE KEY' and secret.parent.is_dir()   # nothing outside was deleted
    failed = [json.loads(l) for l in (tmp_path/'ck'/'mlflow_journal.jsonl.failed.jsonl').read_text().splitlines()]
    assert [e['artifact_path'] for e in failed] == ['dotdot', 'absolute', 'symlink'] and all('outside' in e['error'] for e in failed)


def test_6_two_replays_at_once_register_the_model_once(tmp_path):
    "A resumed run's replay and `nutrilearn-replay` in a shell, at the same time: they take turns on the journal's lock."
    from mlflow import MlflowClient
    from nutrilearn_train.journal import _sidecar, _spool_model
    from nutrilearn_train.models import build_model
    j = tmp_path/'ck'/'mlflow_journal.jsonl'
    spooled = _spool_model(build_model('mobilenet_v2', 3, pretrained=False), _sidecar(j, '.files')/'m')
    j = _journal_with(tmp_path, {'op': 'model', 'name': 'model', 'registered_model_name': 'twice', 'alias': 'champion', 'pip_requirements': None, **spooled})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()   # create the store's tables first: two processes creating them at once is MLflow's race, not ours
    ps = [subprocess.Popen([str(BIN/'nutrilearn-replay'), '--journal', str(j), '--tracking-uri', uri], stdout=subprocess.PIPE, text=True)
          for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in ps]
    assert all(p.returncode == 0 for p in ps), outs
    assert len(MlflowClient(uri).search_model_versions("name='twice'")) == 1, outs
    assert sorted('replayed 2 call(s)' in o for o in outs) == [False, True], outs   # one sent it, the other found it done


# ---------------------------------------------------------------- 10: a full disk while journalling does not end training

def test_10_a_full_disk_while_journalling_warns_and_training_goes_on(tmp_path, monkeypatch):
    import errno
    from nutrilearn_train import tracking
    from nutrilearn_train.test_utils import synth_loaders, tiny, tiny_cfg, quiet
    from nutrilearn_train.train import fit
    def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(tracking, 'append_journal', full)
    class Down(tracking.InMemoryTracker):
        def log_metrics(self, metrics, step): raise ConnectionError('tracking server unreachable')
    g = tracking.GuardedTracker(Down(), tmp_path/'ck'/tracking.JOURNAL_NAME); g.start()
    with pytest.warns(UserWarning, match=r"could not journal the tracking call 'metrics'.*No space left on device.*free space in"):
        res, _ = quiet(fit, tiny(), *synth_loaders(), tiny_cfg(tmp_path, epochs=2), tracker=g, progress=False)
    assert [h['epoch'] for h in res['history']] == [1, 2] and (tmp_path/'ck'/'last.pth').is_file()


def test_10_a_full_disk_under_the_prediction_log_costs_log_lines_not_answers(tmp_path):
    "The log is /dev/full, where every write fails with ENOSPC as on a full disk: the answers come back, with a warning."
    from nutrilearn_train.inference import Predictor
    if not os.path.exists('/dev/full'): pytest.skip('/dev/full (Linux) is needed to fill a disk without filling one')
    d, photo = _tiny_model_dir(tmp_path/'m'), _jpeg(size=(64, 48))
    ok, full = Predictor.from_dir(d, device='cpu'), Predictor.from_dir(d, device='cpu')
    ok.log_path, full.log_path = tmp_path/'log.jsonl', Path('/dev/full')
    with pytest.warns(UserWarning, match=r"could not write 1 prediction log line\(s\) to /dev/full .*No space left on device.*free space in /dev"):
        got = full.predict(photo, top_k=3)
    assert got == ok.predict(photo, top_k=3) and got.prediction_id
    assert len((tmp_path/'log.jsonl').read_text().splitlines()) == 1


# ---------------------------------------------------------------- 13: a study on SQLite does not lose a trial to "database is locked"

def test_13_a_tune_study_on_sqlite_waits_for_a_busy_database(tmp_path):
    "Another worker holds the write lock for 7 s (longer than SQLite's default 5 s wait): telling the trial still succeeds."
    import sqlite3, threading, time
    pytest.importorskip('optuna')
    from nutrilearn_train.tune import open_study
    db = tmp_path/'optuna.db'
    study = open_study('busy', f'sqlite:///{db}')
    trial = study.ask()
    locked, release = threading.Event(), threading.Event()
    def hold():
        con = sqlite3.connect(db, timeout=0); con.execute('BEGIN IMMEDIATE'); locked.set()
        release.wait(7); con.rollback(); con.close()
    t = threading.Thread(target=hold); t.start(); locked.wait(10)
    threading.Timer(7, release.set).start()
    t0 = time.monotonic()
    study.tell(trial, 0.5)                               # waits for the lock instead of raising OperationalError
    t.join()
    assert time.monotonic() - t0 >= 5 and [tr.state.name for tr in open_study('busy', f'sqlite:///{db}').trials] == ['COMPLETE']


def test_10_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch):
    "The disk fills up while epoch 2's checkpoint is written: a warning says where space is needed, epoch 1's survives, epoch 3 is saved."
    import errno
    from nutrilearn_train.persistence import read_checkpoint
    from nutrilearn_train.test_utils import synth_loaders, tiny, tiny_cfg, quiet
    from nutrilearn_train.train import fit
    real_save, calls = torch.save, []
    def save(obj, f, *a, **k):
        calls.append(obj.get('epoch') if isinstance(obj, dict) else None)
        if calls[-1] == 2: f.write(b'partial'); raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.warns(UserWarning, match=r"the disk is full: could not write the checkpoint .*last\.pth.*free space in .*training continues"):
        res, _ = quiet(fit, tiny(), *synth_loaders(), tiny_cfg(tmp_path, epochs=3), progress=False)
    assert [h['epoch'] for h in res['history']] == [1, 2, 3] and 2 in calls
    assert read_checkpoint(tmp_path/'ck'/'last.pth')['epoch'] == 3 and not list((tmp_path/'ck').glob('*.tmp'))


# ---------------------------------------------------------------- 7: exported files are checked before they are loaded

def _exported(tmp_path:Path, name='m.torchscript.pt', **cfg_changes):
    from nutrilearn_train.export import export_torchscript
    from nutrilearn_train.inference import load_model_for_inference
    model, mc = load_model_for_inference(_tiny_model_dir(tmp_path/name.split('.')[0]), None, 'cpu')
    return export_torchscript(model, {**mc, **cfg_changes}, tmp_path/name)


def test_7_an_exported_file_changed_after_export_is_not_loaded(tmp_path):
    from nutrilearn_train.inference import Predictor, export_digest_path, load_exported
    r = _exported(tmp_path)
    side = export_digest_path(r.path)
    assert side.read_text() == f"{hashlib.sha256(r.path.read_bytes()).hexdigest()}  {r.path.name}\n" == f"{r.sha256}  {r.path.name}\n"
    photo = _jpeg(size=(64, 48))
    before = Predictor.from_export(r.path).predict(photo, top_k=3)
    other = _exported(tmp_path, 'other.torchscript.pt', temperature=5.0)     # a valid export of another model, swapped in
    shutil.copyfile(other.path, r.path)
    with pytest.raises(ValueError, match='does not match m.torchscript.pt.sha256') as e: Predictor.from_export(r.path)
    assert 'export the model again' in str(e.value)
    shutil.copyfile(other.path, r.path); r.path.write_bytes(r.path.read_bytes()[:-1] + b'\0')   # one byte flipped
    with pytest.raises(ValueError, match='does not match'): load_exported(r.path)
    side.unlink()                                                             # no digest recorded at all
    with pytest.raises(ValueError, match=r'no recorded digest .*sha256sum m.torchscript.pt > m.torchscript.pt.sha256'): load_exported(r.path)
    shutil.copyfile(_exported(tmp_path, 'again.torchscript.pt').path, r.path)   # a digest passed by the caller is enough
    again = Predictor.from_export(r.path, sha256=hashlib.sha256(r.path.read_bytes()).hexdigest()).predict(photo, top_k=3)
    assert [c for c, _ in again] == [c for c, _ in before]
    with pytest.raises(ValueError, match='does not match the sha256 passed in'): Predictor.from_export(r.path, sha256='0' * 64)


def test_7_an_export_without_mean_and_std_gets_the_pipeline_normalisation_or_a_clear_error(tmp_path):
    from nutrilearn_train.inference import Predictor
    photo = _jpeg(size=(64, 48))
    full = Predictor.from_export(_exported(tmp_path).path).predict(photo, top_k=3)
    bare = Predictor.from_export(_exported(tmp_path, 'bare.torchscript.pt', mean=None, std=None).path)   # was: TypeError: len(None)
    assert bare.predict(photo, top_k=3) == full   # None means what a missing key means: the ImageNet values training normalised with
    with pytest.raises(ValueError, match=r"model config mean is 'zero'; it must be 3 numbers"):
        Predictor.from_export(_exported(tmp_path, 'odd.torchscript.pt', mean='zero').path)
