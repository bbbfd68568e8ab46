"Property tests for the promotion rule (`tracking.promotion_decision`) and the data fingerprint."
from hypothesis import given, settings, strategies as st

from nutrilearn_train.tracking import data_fingerprint, promotion_decision

PROPS = settings(max_examples=200, deadline=None, derandomize=True)
acc = st.floats(0, 1, allow_nan=False)
fps = st.sampled_from(['a' * 64, 'b' * 64])


@PROPS
@given(new=acc, old=acc, margin=st.floats(0, 0.5, allow_nan=False), fp_new=fps, fp_old=fps, subset=st.booleans(),
       champion_kind=st.sampled_from(['none', 'unreadable', 'tagged', 'untagged']))
def test_auto_promotes_only_a_comparable_strict_improvement(new, old, margin, fp_new, fp_old, subset, champion_kind):
    champ = {'none': None, 'unreadable': False, 'tagged': {'version': 4, 'tags': {'test_top1': str(old), 'data_fingerprint': fp_old}},
             'untagged': {'version': 4, 'tags': {}}}[champion_kind]
    ok, why = promotion_decision('auto', new, fp_new, champ, subset, margin)
    assert isinstance(why, str) and why
    if ok: assert not subset and (champ is None or (champion_kind == 'tagged' and fp_new == fp_old and new > old + margin))
    else: assert subset or champion_kind in ('unreadable', 'untagged') or (champion_kind == 'tagged' and (fp_new != fp_old or new <= old + margin))
    if ok and champ: assert promotion_decision('auto', min(1.0, new + 0.01), fp_new, champ, subset, margin)[0]   # better still promotes
    assert promotion_decision('always', new, fp_new, champ, subset, margin)[0] and not promotion_decision('never', new, fp_new, champ, subset, margin)[0]


@PROPS
@given(classes=st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=6, unique=True),
       files=st.lists(st.text(min_size=1, max_size=10), max_size=10, unique=True), data=st.data())
def test_fingerprint_ignores_file_order_but_not_content(classes, files, data):
    shuffled = data.draw(st.permutations(files))
    assert data_fingerprint(classes, files) == data_fingerprint(classes, shuffled)
    assert data_fingerprint(classes, files) != data_fingerprint(classes, files + ['extra/one.jpg' if 'extra/one.jpg' not in files else 'x'])
    assert data_fingerprint(classes, files) != data_fingerprint(classes[::-1], files)
