"""The pieces of the Colab-like environment check (tests/colab_env.sh) that can be wrong on their own: reading Colab's
freeze, finding notebook 99's install command, the package diff, and the widget-protocol checks (which must reject
what ipywidgets 8 sends). The check itself runs from .ci/run (it needs a Python 3.13 and the network)."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import colab_env as ce
import colab_notebook_check as cnc

ROOT = HERE.parent
FREEZE = ROOT.parent / 'shared' / 'colab' / 'pip-freeze.gpu.txt'


def test_parse_freeze_drops_local_labels_and_urls():
    text = "torch==2.11.0+cu128\nPillow==11.3.0\ngoogle-colab @ file:///colabtools/dist/x.tar.gz\njupyter_core==5.9.1\n"
    assert ce.parse_freeze(text) == {'torch': '2.11.0', 'pillow': '11.3.0', 'jupyter-core': '5.9.1'}


def test_constraints_and_pins_leave_out_the_cuda_build():
    freeze = {'torch': '2.11.0', 'nvidia-nccl-cu13': '2.31.2', 'cuda-bindings': '12.9', 'protobuf': '5.29.6'}
    assert ce.constraints(freeze) == ['protobuf==5.29.6', 'torch==2.11.0']
    assert ce.pins(freeze, {'torch', 'nvidia-nccl-cu13', 'mlflow'}) == ['torch==2.11.0']


@pytest.mark.skipif(not FREEZE.is_file(), reason=f"Colab's freeze not found at {FREEZE}")
def test_real_freeze_has_what_the_check_relies_on():
    f = ce.parse_freeze(FREEZE.read_text())
    assert (f['ipywidgets'], f['protobuf'], f['grpcio-status'], f['torch']) == ('7.7.1', '5.29.6', '1.71.2', '2.11.0')


def test_install_args_come_from_notebook_99():
    nb = json.loads((ROOT / 'nbs' / '99_run_training.ipynb').read_text())
    assert ce.install_args(nb, '/src') == ['/src']   # `%pip install {PACKAGE}`: no flags, no extras
    with pytest.raises(ValueError, match='no `%pip install'): ce.install_args({'cells': []}, '/src')


def test_diff_reports_changed_removed_and_added():
    changed, added = ce.diff({'a': '1', 'b': '2', 'c': '3'}, {'a': '1', 'b': '2.1', 'd': '4'})
    assert changed == {'b': ('2', '2.1'), 'c': ('3', None)} and added == {'d': '4'}


def test_diff_command_fails_unless_allowed(tmp_path, capsys):
    (tmp_path / 'b.json').write_text(json.dumps({'certifi': '1', 'protobuf': '5.29.6'}))
    (tmp_path / 'a.json').write_text(json.dumps({'certifi': '2', 'protobuf': '5.29.6'}))
    args = ['diff', str(tmp_path / 'b.json'), str(tmp_path / 'a.json')]
    assert ce.main(args) == 1 and 'CHANGED certifi 1 -> 2' in capsys.readouterr().out
    assert ce.main(args + ['certifi']) == 0 and 'changed (allowed) certifi 1 -> 2' in capsys.readouterr().out


def _executed_nb(models: dict, views: list, outputs=()) -> dict:
    state = {mid: {'model_name': name, 'model_module': st['_model_module'], 'model_module_version': st['_model_module_version'],
                   'state': st, **({'buffers': bufs} if bufs else {})} for mid, (name, st, bufs) in models.items()}
    cells = [{'cell_type': 'code', 'outputs': [{'output_type': 'display_data', 'data': {
        'application/vnd.jupyter.widget-view+json': {'model_id': v, 'version_major': 2, 'version_minor': 0}}} for v in views] + list(outputs)}]
    return {'cells': cells, 'metadata': {'widgets': {'application/vnd.jupyter.widget-state+json': {'state': state}}}}


def _form_models(version: str) -> dict:
    "What the form sends, with the given controls module version (ipywidgets 7: 1.5.0, 8: 2.0.0)."
    ctl = lambda **k: {'_model_module': '@jupyter-widgets/controls', '_model_module_version': version,
                       '_view_module': '@jupyter-widgets/controls', '_view_module_version': version, **k}
    import base64
    png = base64.b64encode(cnc.PNG + b'rest').decode()
    models = {f'm{i}': (n, ctl(), None) for i, n in enumerate(sorted(cnc.FORM_MODELS - {'OutputModel', 'ImageModel'}))}
    models['out'] = ('OutputModel', {'_model_module': '@jupyter-widgets/output', '_model_module_version': '1.0.0',
                                     '_view_module': '@jupyter-widgets/output', '_view_module_version': '1.0.0'}, None)
    models['img'] = ('ImageModel', ctl(), [{'path': ['value'], 'encoding': 'base64', 'data': png}])
    return models


def test_widget_checks_accept_ipywidgets7_and_reject_8():
    assert cnc.widget_problems(_executed_nb(_form_models('1.5.0'), ['m0'])) == []
    bad = cnc.widget_problems(_executed_nb(_form_models('2.0.0'), ['m0']))
    assert any("model module @jupyter-widgets/controls 2.0.0 is not ipywidgets 7's" in b for b in bad), bad


def test_widget_checks_find_missing_pieces():
    models = _form_models('1.5.0')
    del models['out']
    models['img'] = ('ImageModel', models['img'][1], None)
    bad = cnc.widget_problems(_executed_nb(models, ['m0', 'ghost']))
    assert "the form's widgets are missing: ['OutputModel']" in bad
    assert 'view of unknown model ghost' in bad and 'the live chart (an Image widget) never received a PNG' in bad
    assert cnc.widget_problems({'cells': [], 'metadata': {}})[0].startswith('no widget state recorded')


def test_widget_checks_on_real_ipywidgets_state():
    "The state this environment's ipywidgets (8 here) produces is what the check must reject on Colab."
    import ipywidgets as W
    if W.__version__.startswith('7.'): pytest.skip('this environment has ipywidgets 7')
    b = W.Button(description='Train')
    st = b.get_state()
    nb = _executed_nb({b.model_id: ('ButtonModel', st, None)}, [b.model_id])
    assert any('is not ipywidgets 7' in p for p in cnc.widget_problems(nb))


def test_output_checks():
    import base64
    png = {'output_type': 'display_data', 'data': {'image/png': base64.b64encode(cnc.PNG).decode()}}
    ok = {'output_type': 'stream', 'name': 'stdout', 'text': 'MLflow run id: ' + 'a' * 32 + '\nTest split: top-1 …'}
    assert cnc.output_problems({'cells': [{'outputs': [ok, png, png, png]}]}) == []
    err = {'output_type': 'error', 'ename': 'ValueError', 'evalue': 'boom', 'traceback': []}
    bad = cnc.output_problems({'cells': [{'outputs': [err, png]}]})
    assert 'error output: ValueError: boom' in bad and any('expected >= 3 PNG outputs' in b for b in bad), bad


def test_script_refuses_to_run_without_python_313(tmp_path):
    "No silent skip: without Python 3.13 the check fails and says how to fix it."
    r = subprocess.run(['bash', str(HERE / 'colab_env.sh')], capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'NUTRILEARN_PY313': sys.executable if sys.version_info[:2] != (3, 13) else '/nonexistent',
                            'NUTRILEARN_CACHE': str(tmp_path)})
    assert r.returncode != 0 and 'no Python 3.13 found' in r.stderr and 'NUTRILEARN_PY313' in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())   # it stopped before building anything


def test_click_checks():
    "After the protocol click, the form's Output widget must hold a new run's id and its PNGs, and the form no error."
    import base64
    png = {'output_type': 'display_data', 'data': {'image/png': base64.b64encode(cnc.PNG).decode()}}
    run = lambda rid: {'output_type': 'stream', 'name': 'stdout', 'text': f'MLflow run id: {rid}\n'}
    def nb(click_outs, error=''):
        st = {'o': {'model_name': 'OutputModel', 'state': {'outputs': click_outs}},
              'e': {'model_name': 'HTMLModel', 'state': {'value': error}}}
        return {'cells': [{'outputs': [run('a' * 32)]}], 'metadata': {'widgets': {'application/vnd.jupyter.widget-state+json': {'state': st}}}}
    assert cnc.click_problems(nb([run('b' * 32), png, png, png])) == []
    assert any('reused run' in b for b in cnc.click_problems(nb([run('a' * 32), png, png, png])))
    bad = cnc.click_problems(nb([png], error='<b>Could not train:</b> no data'))
    assert any('no run id there' in b for b in bad) and any('got 1 PNGs' in b for b in bad) and any('form shows an error' in b for b in bad), bad
