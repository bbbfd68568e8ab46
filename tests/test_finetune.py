"""Fine-tuning a saved model on new classes (`--init-from`, head expansion, rehearsal) and the recipe options
(`--config`, `--label-smoothing`, `--warmup-epochs`, `--augment`, `--grad-checkpointing`).

The property test checks that merging class lists and expanding the head keep every old class's index and weights.
The integration test runs `nutrilearn-train` as a user does, on food-101-mini split into 5 "old" and 5 "new" classes:
an old model, then two fine-tunes that differ only in `--rehearsal-fraction` (same seed): rehearsal forgets less."""
import copy, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nutrilearn_train.data import merge_class_to_idx
from nutrilearn_train.models import build_model, expand_head, replace_head, get_classifier
from nutrilearn_train.persistence import read_checkpoint

MINI = Path(__file__).parents[1].parent/'shared/data/food-101-mini'
BIN = Path(sys.executable).parent

_BASE = build_model('mobilenet_v2', 2, pretrained=False)
names = st.text(alphabet='abcdefgh_', min_size=1, max_size=4)


@settings(max_examples=100, deadline=None)
@given(old=st.lists(names, min_size=2, max_size=12, unique=True), new=st.lists(names, max_size=12), perm_seed=st.integers(0, 2**16))
def test_expansion_keeps_old_indices_and_weights(old, new, perm_seed):
    g = torch.Generator().manual_seed(perm_seed)
    old_c2i = {c: int(i) for c, i in zip(old, torch.randperm(len(old), generator=g))}   # any saved order
    merged = merge_class_to_idx(old_c2i, new)
    assert all(merged[c] == i for c, i in old_c2i.items())                            # old indices never move
    assert sorted(merged.values()) == list(range(len(merged))) and set(merged) == set(old) | set(new)
    added = sorted(merged, key=merged.get)[len(old):]
    assert added == sorted(set(new) - set(old))                                        # new ones appended, sorted
    model = replace_head(copy.deepcopy(_BASE), len(old))
    w, b = get_classifier(model)[-1].weight.detach().clone(), get_classifier(model)[-1].bias.detach().clone()
    lin = get_classifier(expand_head(model, len(added)))[-1]
    assert lin.out_features == len(merged)
    assert torch.equal(lin.weight[:len(old)].detach(), w) and torch.equal(lin.bias[:len(old)].detach(), b)


def _split_mini(root:Path) -> list:
    "old/ and new/ ImageFolder trees (train/ and test/ of 5 classes each) of symlinks into food-101-mini."
    base = MINI/'food-101'
    classes = sorted(p.name for p in (base/'images').iterdir())
    for split in ('train', 'test'):
        ids = json.loads((base/'meta'/f'{split}.json').read_text())
        for grp, cs in (('old', classes[:5]), ('new', classes[5:])):
            for c in cs:
                d = root/grp/split/c; d.mkdir(parents=True)
                for i in ids[c]: (d/f"{Path(i).name}.jpg").symlink_to(base/'images'/f"{i}.jpg")
    return classes


def _train(d:Path, uri:str, data:str, name:str, *extra) -> subprocess.CompletedProcess:
    args = [str(BIN/'nutrilearn-train'), '--data-dir', str(d/data), '--no-pretrained', '--max-per-class', '8', '--num-workers', '0',
            '--batch-size', '8', '--device', 'cpu', '--checkpoint-dir', str(d/name/'ck'), '--output-dir', str(d/name/'out'),
            '--tracking-uri', uri, '--experiment-name', name, '--seed', '7', *extra]
    r = subprocess.run(args, cwd=d, env={**os.environ, 'PYTHONUNBUFFERED': '1'}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.skipif(not MINI.is_dir(), reason='the food-101-mini sample is missing')
def test_finetune_with_rehearsal_forgets_less(tmp_path):
    classes = _split_mini(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _train(tmp_path, uri, 'old', 'old', '--epochs', '1', '--registered-model-name', 'ft-old', '--promote', 'always')
    recipe = tmp_path/'recipe.json'   # both fine-tunes share the recipe; only the rehearsal fraction differs
    recipe.write_text(json.dumps(dict(epochs=9, scheduler='cosine', warmup_epochs=1, label_smoothing=0.1, augment='trivialaugment',
                                      grad_checkpointing=True, learning_rate=0.002)))
    common = ['--config', str(recipe), '--epochs', '2', '--rehearsal-dir', str(tmp_path/'old'), '--registered-model-name', 'ft-new', '--promote', 'never']
    # one from the registry, one from the version folder: the same saved weights either way
    ra = _train(tmp_path, uri, 'new', 'rehearse', '--init-from', 'models:/ft-old@champion', '--rehearsal-fraction', '0.5', *common)
    rb = _train(tmp_path, uri, 'new', 'plain', '--init-from', str(tmp_path/'old/out/v1'), '--rehearsal-fraction', '0', *common)
    mca, mcb = (json.loads((tmp_path/n/'out/v1/model_config.json').read_text()) for n in ('rehearse', 'plain'))
    assert mca['class_names'] == mcb['class_names'] == classes                    # old 5 keep 0..4, new 5 appended as 5..9
    assert mca['old_class_acc_before'] == mcb['old_class_acc_before']             # the same saved model, the same old test images
    print(f"\nold-class top-1 before {mca['old_class_acc_before']:.1%}; after: rehearsal {mca['old_class_acc_after']:.1%} "
          f"(forgetting {mca['forgetting_points']:.1f} points), no rehearsal {mcb['old_class_acc_after']:.1%} "
          f"(forgetting {mcb['forgetting_points']:.1f} points); new-class top-1 {mca['new_class_acc']:.1%} / {mcb['new_class_acc']:.1%}")
    assert mca['forgetting_points'] < mcb['forgetting_points']
    assert 'old classes: top-1' in ra.stdout and 'forgetting' in rb.stdout
    # the recipe reached the run: params in MLflow, the config inside the checkpoint (what --resume compares)
    from mlflow import MlflowClient
    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name('rehearse').experiment_id])[0]
    p = run.data.params
    assert (p['label_smoothing'], p['warmup_epochs'], p['augment'], p['grad_checkpointing'], p['epochs'], p['rehearsal_fraction'], p['init_from']) == \
           ('0.1', '1', 'trivialaugment', 'True', '2', '0.5', 'models:/ft-old@champion')
    assert {'old_class_acc_before', 'old_class_acc_after', 'forgetting_points', 'new_class_acc'} <= set(run.data.metrics)
    ck = read_checkpoint(tmp_path/'rehearse/ck/last.pth')   # weights only
    assert (ck['config']['label_smoothing'], ck['config']['augment'], ck['class_to_idx']) == (0.1, 'trivialaugment', {c: i for i, c in enumerate(classes)})
