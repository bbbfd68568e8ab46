"Property tests for A/B routing (`inference.route`) and the drift score (`monitoring.js_distance`)."
import math

from hypothesis import assume, given, settings, strategies as st

from nutrilearn_train.inference import route
from nutrilearn_train.monitoring import js_distance

PROPS = settings(max_examples=100, deadline=None, derandomize=True)
ALIASES = ['champion', 'challenger', 'canary', 'shadow']
weights = st.lists(st.integers(0, 20), min_size=2, max_size=4).filter(lambda ws: sum(ws) > 0).map(lambda ws: dict(zip(ALIASES, ws)))


@PROPS
@given(w=weights, salt=st.text(max_size=8))
def test_routing_split_follows_the_weights(w, salt):
    "Over 4000 keys each alias gets its share (± 0.035, > 4 binomial sigmas); zero-weight aliases get nothing; routing is stable."
    n, total = 4000, sum(w.values())
    got = [route(f'{salt}-{i}', w) for i in range(n)]
    for alias, wt in w.items():
        share = got.count(alias) / n
        if wt == 0: assert share == 0, (alias, w)
        else: assert abs(share - wt / total) < 0.035, (alias, share, w)
    assert got[:50] == [route(f'{salt}-{i}', w) for i in range(50)]


@PROPS
@given(p=st.lists(st.floats(0, 10), min_size=2, max_size=12), q=st.lists(st.floats(0, 10), min_size=2, max_size=12))
def test_js_distance_is_a_bounded_symmetric_score(p, q):
    n = min(len(p), len(q)); p, q = p[:n], q[:n]
    assume(sum(p) > 0 and sum(q) > 0)
    d = js_distance(p, q)
    assert 0 <= d <= 1 + 1e-9 and math.isclose(d, js_distance(q, p), abs_tol=1e-9)
    assert js_distance(p, p) < 1e-6


def test_backend_round_trip_feedback_to_live_accuracy(tmp_path):
    "A backend answers real photos, users correct some (Predictor.feedback), and nutrilearn-monitor reports each version's live accuracy."
    import json, os, subprocess, sys
    from pathlib import Path
    import torch
    from nutrilearn_train.feedback import FeedbackStore
    from nutrilearn_train.inference import Predictor
    from nutrilearn_train.models import build_model
    from nutrilearn_train.persistence import save_model_artifacts
    mini = Path(__file__).parents[1].parent/'shared/data/food-101-mini/food-101/images'
    classes = sorted(p.name for p in mini.iterdir())[:3]
    torch.manual_seed(0)
    vdir = save_model_artifacts(build_model('mobilenet_v2', 3, pretrained=False).eval(), {c: i for i, c in enumerate(classes)},
                                {'model_name': 'mobilenet_v2', 'image_size': 64}, output_dir=tmp_path/'out')
    pred = Predictor.from_dir(vdir, device='cpu', feedback=tmp_path/'fb'); pred.log_path = tmp_path/'p.jsonl'
    photos = [(c, p) for c in classes for p in sorted((mini/c).glob('*.jpg'))[:3]]
    answers = [(c, pred.predict(p)) for c, p in photos]
    for truth, a in answers: pred.feedback(a.prediction_id, truth, source='user')   # each user says what the dish really is
    agree = sum(a[0][0] == truth for truth, a in answers)
    with FeedbackStore(tmp_path/'fb') as s: assert s.agreement() == {'1': dict(answers=9, agree=agree, rate=agree / 9)}
    logged = [json.loads(l)['prediction_id'] for l in (tmp_path/'p.jsonl').read_text().splitlines()]
    assert logged == [a.prediction_id for _, a in answers]   # the log and the store share the keys
    r = subprocess.run([str(Path(sys.executable).parent/'nutrilearn-monitor'), str(tmp_path/'p.jsonl'), '--model-dir', str(vdir),
                        '--feedback-store', str(tmp_path/'fb')], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert f"version 1: users' labels agree with {agree} of its 9 answers ({agree / 9:.1%})" in r.stdout, r.stdout
