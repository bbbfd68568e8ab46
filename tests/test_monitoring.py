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
