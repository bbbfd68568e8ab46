"""Issue 20 items 3 and 6: every quality figure on the real ImageNet backbone (../shared/weights/mobilenet_v2_imagenet.pth).

Not a test. Three steps; each writes its part of bench/results/quality.json, and `doc` renders docs/quality.md from it:

    python bench/quality.py recipes [--seeds 3] [--epochs 3]   # recipes x {food-101-mini, indian-dishes-mini} x seeds (the real CLI)
    python bench/quality.py figures                             # exports, pruning, ensemble, Grad-CAM, mining, forgetting
    python bench/quality.py doc

`recipes` trains with `nutrilearn-train` as a subprocess (CPU, batch 32, 1 loader worker) and reads the test top-1 the run
wrote into its model_config.json; wall time is the whole command (training, calibration, test evaluation, registration).
`figures` uses the models of the recipe named by `--recipe` (default: the best mean test top-1 on food-101-mini): seed 0
for exports, pruning, Grad-CAM; all seeds for the ensemble; and trains the few extra models it needs (noisy labels,
7 + 3 classes, Indian dishes added) with the same recipe through the CLI. Model folders stay under --work for a rerun.
"""
import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import argparse, json, random, shutil, statistics, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
WEIGHTS = SHARED / 'weights' / 'mobilenet_v2_imagenet.pth'
DATASETS = {'food-101-mini': SHARED / 'data' / 'food-101-mini', 'indian-dishes-mini': SHARED / 'data' / 'indian-dishes-mini'}
RESULTS, DOC = ROOT / 'bench' / 'results' / 'quality.json', ROOT / 'docs' / 'quality.md'
BIN = Path(sys.executable).parent

# The recipes compared. `design`: the config's defaults (the design's TrainingConfig: Adam 1e-3, first 10 blocks frozen,
# ReduceLROnPlateau); the others change only what they name.
RECIPES = {
    'design': [],
    'head': ['--freeze-layers', '-1'],
    'fine-tune': ['--freeze-epochs', '1', '--freeze-layers', '0', '--layer-decay', '0.7'],
    'fine-tune+mixup': ['--freeze-epochs', '1', '--freeze-layers', '0', '--layer-decay', '0.7', '--mixup', '0.2'],
}
RECIPE_TEXT = {
    'design': 'config defaults: Adam lr 1e-3, feature blocks 0-9 frozen, ReduceLROnPlateau',
    'head': '`--freeze-layers -1`: the whole backbone frozen (BatchNorm in eval mode), only the classifier trains',
    'fine-tune': '`--freeze-epochs 1 --freeze-layers 0 --layer-decay 0.7`: 1 epoch head only, then everything, lr x 0.7 per stage towards the stem',
    'fine-tune+mixup': 'fine-tune plus `--mixup 0.2`',
}


def load() -> dict: return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(res:dict):
    RESULTS.parent.mkdir(parents=True, exist_ok=True); RESULTS.write_text(json.dumps(res, indent=1, sort_keys=True) + '\n')


def train(data_dir:Path, out:Path, seed:int, epochs:int, extra:list, name:str) -> dict:
    "Run the real CLI once; `{'config': model_config.json, 'seconds': wall time}` (reused when `out` already holds a finished run)."
    cfg = out / 'outputs' / 'v1' / 'model_config.json'
    if cfg.is_file(): return dict(config=json.loads(cfg.read_text()), seconds=json.loads((out / 'wall.json').read_text())['seconds'])
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    cmd = [str(BIN / 'nutrilearn-train'), '--data-dir', str(data_dir), '--weights-path', str(WEIGHTS), '--epochs', str(epochs),
           '--seed', str(seed), '--batch-size', '32', '--num-workers', '1', '--device', 'cpu', '--output-dir', str(out / 'outputs'),
           '--checkpoint-dir', str(out / 'ck'), '--tracking-uri', f"sqlite:///{out / 'mlflow.db'}", '--experiment-name', name,
           '--registered-model-name', name, '--promote', 'never', *extra]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    secs = time.monotonic() - t0
    (out / 'train.log').write_text(' '.join(cmd) + '\n\n' + r.stdout + r.stderr)
    if r.returncode: raise SystemExit(f"training failed ({out / 'train.log'}):\n{r.stderr[-3000:]}")
    (out / 'wall.json').write_text(json.dumps(dict(seconds=secs)))
    return dict(config=json.loads(cfg.read_text()), seconds=secs)


def run_recipes(a):
    res = load(); part = res.setdefault('recipes', {})
    part['setup'] = dict(epochs=a.epochs, seeds=a.seeds, batch_size=32, device='cpu', threads=torch.get_num_threads(),
                         command=f"python bench/quality.py recipes --seeds {a.seeds} --epochs {a.epochs} --recipes {','.join(a.recipes)}")
    for seed in range(a.seeds):   # seed outermost: a run cut short still compares every recipe on both data sets
        for ds in a.datasets:
            for rec in a.recipes:
                r = train(DATASETS[ds], a.work / ds / rec / f's{seed}', seed, a.epochs, RECIPES[rec], f'q-{ds}-{rec}-s{seed}')
                c = r['config']
                part.setdefault(ds, {}).setdefault(rec, {})[str(seed)] = dict(
                    test_top1=c['test_top1'], test_top5=c.get('test_top5'), seconds=round(r['seconds'], 1),
                    ece_before=c.get('test_ece_before'), ece_after=c.get('test_ece_after'), uncertain_share=c.get('test_uncertain_share'),
                    answered_top1=c.get('test_answered_top1'), selected_epoch=c.get('selected_epoch'))
                print(f"{ds:18s} {rec:16s} seed {seed}: test top-1 {c['test_top1']:.3f}  {r['seconds']:.0f} s", flush=True)
                save(res)


def best_recipe(res:dict) -> str:
    food = res['recipes']['food-101-mini']
    return max(food, key=lambda r: statistics.mean(v['test_top1'] for v in food[r].values()))


# ------------------------------------------------------------------ figures

def test_split(data_dir:Path, class_names:list) -> tuple[list, torch.Tensor]:
    from nutrilearn_train.data import find_dataset
    pairs = find_dataset(data_dir)['test']
    return [p for p, _ in pairs], torch.tensor([class_names.index(c) for _, c in pairs])


def tensors(paths:list, config:dict) -> torch.Tensor:
    from nutrilearn_train.data import load_image
    from nutrilearn_train.predict import build_inference_transform
    tf = build_inference_transform(config)
    return torch.stack([tf(load_image(p)) for p in paths])


@torch.inference_mode()
def logits_of(run, xb:torch.Tensor, bs:int=50) -> torch.Tensor:
    return torch.cat([run(xb[i:i + bs]).float() for i in range(0, len(xb), bs)])


def acc(logits:torch.Tensor, y:torch.Tensor) -> float: return float((logits.argmax(1) == y).float().mean())


def fig_exports(model_dir:Path, data_dir:Path) -> dict:
    "Eager vs the three exported files, each written by the real `nutrilearn-export` and loaded as the backend loads it."
    from nutrilearn_train.inference import load_exported, load_model_for_inference
    model, mc = load_model_for_inference(model_dir, None, 'cpu')
    paths, y = test_split(data_dir, mc['class_names']); xb = tensors(paths, mc)
    out = {'eager': acc(logits_of(model, xb), y)}
    for fmt in ('torchscript', 'onnx', 'int8'):
        r = subprocess.run([str(BIN / 'nutrilearn-export'), '--model-dir', str(model_dir), '--format', fmt], capture_output=True, text=True)
        if r.returncode: raise SystemExit(r.stdout + r.stderr)
        path = Path(r.stdout.split('wrote ', 1)[1].split(' (', 1)[0])
        run, _ = load_exported(path)
        out[fmt] = acc(logits_of(run, xb), y); out[f'{fmt}_mb'] = path.stat().st_size / 1e6
        print(f"export {fmt}: test top-1 {out[fmt]:.3f} ({path.name}, {out[f'{fmt}_mb']:.1f} MB)", flush=True)
    return dict(out, model=str(model_dir), test_images=len(y))


def fig_pruning(model_dir:Path, data_dir:Path) -> list:
    from nutrilearn_train.export import prune_for_export
    from nutrilearn_train.inference import load_model_for_inference
    rows = []
    for amount in (0.3, 0.5):
        for epochs in (0, 1):
            model, mc = load_model_for_inference(model_dir, None, 'cpu')
            t0 = time.monotonic()
            _, rep = prune_for_export(model, mc, amount, epochs, data_dir)
            rows.append(dict(amount=amount, prune_epochs=epochs, top1_before=rep['before']['top1'], top1_after=rep['after']['top1'],
                             sparsity=rep['after']['sparsity'], gzip_mb_before=rep['before']['gzip_bytes'] / 1e6,
                             gzip_mb_after=rep['after']['gzip_bytes'] / 1e6, seconds=round(time.monotonic() - t0, 1)))
            print('pruning', rows[-1], flush=True)
    return rows


def fig_ensemble(model_dirs:list, data_dir:Path) -> dict:
    "Members and their ensemble (`Predictor.ensemble`: the mean of each member's calibrated probabilities), top-1 on the test split."
    from nutrilearn_train.inference import Predictor
    members = [Predictor.from_dir(d, device='cpu') for d in model_dirs]
    ens = Predictor.ensemble(members)
    paths, y = test_split(data_dir, members[0].class_names)
    def top1(pred):
        got = [p for i in range(0, len(paths), 32) for p in pred.predict_batch(paths[i:i + 32], top_k=1)]
        return float(np.mean([g[0][0] == pred.class_names[int(t)] for g, t in zip(got, y)]))
    m = [top1(p) for p in members]
    return dict(members=m, ensemble=top1(ens), best_member=max(m), test_images=len(y))


def deletion_curve(model, xb:torch.Tensor, y:torch.Tensor, maps:np.ndarray, steps:int=10) -> list:
    "Top-1 accuracy after replacing the most salient k/steps of the pixels (ranked by `maps`) with the mean colour (0 after normalising)."
    n, _, h, w = xb.shape
    order = torch.from_numpy(np.argsort(-maps.reshape(n, -1), axis=1).copy())
    accs = []
    for k in range(steps + 1):
        x = xb.clone().view(n, 3, -1)
        cut = order[:, :round(k / steps * h * w)]
        x.scatter_(2, cut.unsqueeze(1).expand(-1, 3, -1), 0.0)
        accs.append(acc(logits_of(model, x.view(n, 3, h, w)), y))
    return accs


def fig_gradcam(model_dir:Path, data_dir:Path, seed:int=0) -> dict:
    from nutrilearn_train.explain import grad_cam
    from nutrilearn_train.inference import load_model_for_inference
    model, mc = load_model_for_inference(model_dir, None, 'cpu')
    paths, y = test_split(data_dir, mc['class_names']); xb = tensors(paths, mc)
    cams = np.concatenate([grad_cam(model, xb[i:i + 25]) for i in range(0, len(xb), 25)])   # the predicted class, as `--explain` shows
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(len(xb), 1, 7, 7, generator=g)                          # random maps at Grad-CAM's 7 x 7 resolution, upsampled alike
    rnd = torch.nn.functional.interpolate(coarse, size=xb.shape[-2:], mode='bilinear', align_corners=False)[:, 0].numpy()
    cam_curve, rnd_curve = deletion_curve(model, xb, y, cams), deletion_curve(model, xb, y, rnd)
    auc = lambda c: float(np.trapezoid(c, dx=1 / (len(c) - 1)))
    return dict(cam_curve=cam_curve, random_curve=rnd_curve, cam_auc=auc(cam_curve), random_auc=auc(rnd_curve), test_images=len(y))


def link_tree(pairs:list, dst:Path):
    for src, cls in pairs:
        (dst / cls).mkdir(parents=True, exist_ok=True)
        (dst / cls / Path(src).name).symlink_to(Path(src).resolve())


def as_folders(data_dir:Path, dst:Path, classes=None, flip:float=0.0, seed:int=0) -> list:
    "`data_dir` as train/ and test/ class folders of symlinks (only `classes`); `flip` of the training photos get a wrong class."
    from nutrilearn_train.data import find_dataset
    ds = find_dataset(data_dir)
    keep = lambda pairs: [(p, c) for p, c in pairs if classes is None or c in classes]
    train, test = keep(ds['train']), keep(ds['test'])
    names = sorted({c for _, c in train}); flipped = []
    if flip:
        rng = random.Random(seed)
        idx = rng.sample(range(len(train)), round(flip * len(train)))
        for i in idx:
            p, c = train[i]; train[i] = (p, rng.choice([n for n in names if n != c])); flipped.append(str(Path(p).resolve()))
    if not (dst / 'done').is_file():
        shutil.rmtree(dst, ignore_errors=True)
        link_tree(train, dst / 'train'); link_tree(test, dst / 'test'); (dst / 'done').write_text('')
    return flipped


def fig_mining(work:Path, epochs:int, recipe:list) -> dict:
    "10 % of the training labels flipped; train on them; rank every training photo by its loss under its (noisy) label, and by entropy."
    from nutrilearn_train.data import find_dataset
    from nutrilearn_train.inference import Predictor
    from nutrilearn_train.mining import score_images
    from nutrilearn_train.predict import class_probabilities
    noisy = work / 'data' / 'food-noisy'
    flipped = set(as_folders(DATASETS['food-101-mini'], noisy, flip=0.1, seed=0))
    r = train(noisy, work / 'mining' / 'run', 0, epochs, recipe, 'q-mining')
    model_dir = work / 'mining' / 'run' / 'outputs' / 'v1'
    pred = Predictor.from_dir(model_dir, device='cpu')
    pairs = find_dataset(noisy)['train']
    paths = [str(p.resolve()) for p, _ in pairs]
    y = torch.tensor([pred.class_names.index(c) for _, c in pairs])
    logits = logits_of(pred.model, tensors([p for p, _ in pairs], pred.config))
    probs = class_probabilities(logits, pred.config.get('temperature') or 1.0)
    loss = -torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).numpy()
    by_loss = [paths[i] for i in np.argsort(-loss)]
    rows, _ = score_images(pred, paths, 'entropy')
    by_entropy = [str(Path(r_['image']).resolve()) for r_ in rows]
    prec = lambda ranked, k: sum(p in flipped for p in ranked[:k]) / k
    ks = (10, len(flipped))
    return dict(train_images=len(paths), flipped=len(flipped), base_rate=len(flipped) / len(paths),
                loss={str(k): prec(by_loss, k) for k in ks}, entropy={str(k): prec(by_entropy, k) for k in ks},
                model_test_top1=r['config']['test_top1'])


def fig_forgetting(work:Path, epochs:int, recipe:list, food_model:Path) -> tuple:
    "Old-class accuracy lost when new dishes are added with `--init-from`, with and without rehearsal (`--rehearsal-fraction`)."
    from nutrilearn_train.data import find_dataset
    food = DATASETS['food-101-mini']
    names = sorted({c for _, c in find_dataset(food)['train']})
    old7, new3 = work / 'data' / 'food-7', work / 'data' / 'food-3'
    as_folders(food, old7, classes=set(names[:7])); as_folders(food, new3, classes=set(names[7:]))
    base7 = train(old7, work / 'forget' / 'base7', 0, epochs, recipe, 'q-base7')
    cases = [('7 food classes + 3 food classes', work / 'forget' / 'base7' / 'outputs' / 'v1', new3, old7),
             ('10 food classes + 6 Indian dishes', food_model, DATASETS['indian-dishes-mini'], food)]
    rows = []
    for label, init, new, old in cases:
        for frac in (0.0, 0.5):
            out = work / 'forget' / f"{label.split()[0]}-{new.name}-r{frac}"
            r = train(new, out, 0, epochs, [*recipe, '--init-from', str(init), '--rehearsal-dir', str(old),
                                            '--rehearsal-fraction', str(frac)], 'q-forget')
            c = r['config']
            rows.append(dict(case=label, rehearsal_fraction=frac, old_before=c['old_class_acc_before'], old_after=c['old_class_acc_after'],
                             forgetting_points=c['forgetting_points'], new_class_acc=c.get('new_class_acc'), seconds=round(r['seconds'], 1)))
            print('forgetting', rows[-1], flush=True)
    return rows, base7['config']['test_top1']


def run_figures(a):
    res = load()
    rec = a.recipe or best_recipe(res)
    recipe, food = RECIPES[rec], DATASETS['food-101-mini']
    dirs = [a.work / 'food-101-mini' / rec / f's{s}' / 'outputs' / 'v1' for s in range(a.seeds)]
    missing = [d for d in dirs if not (d / 'model_config.json').is_file()]
    if missing: raise SystemExit(f"run `python bench/quality.py recipes` first (with the same --work): {missing[0]} is missing")
    part = res.setdefault('figures', {}); part['recipe'] = rec
    part['command'] = f"python bench/quality.py figures --recipe {rec} --epochs {a.epochs}"
    steps = a.only or ['exports', 'pruning', 'ensemble', 'gradcam', 'mining', 'forgetting']
    for step in steps:
        t0 = time.monotonic()
        if step == 'exports': part['exports'] = fig_exports(dirs[0], food)
        elif step == 'pruning': part['pruning'] = fig_pruning(dirs[0], food)
        elif step == 'ensemble': part['ensemble'] = fig_ensemble(dirs, food)
        elif step == 'gradcam': part['gradcam'] = fig_gradcam(dirs[0], food)
        elif step == 'mining': part['mining'] = fig_mining(a.work, a.epochs, recipe)
        elif step == 'forgetting':
            rows, base7 = fig_forgetting(a.work, a.epochs, recipe, dirs[0])
            part['forgetting'] = dict(rows=rows, base7_test_top1=base7)
        part.setdefault('seconds', {})[step] = round(time.monotonic() - t0, 1)
        print(f"{step}: {part[step]}", flush=True)
        save(res)


# ------------------------------------------------------------------ docs/quality.md

def pct(x): return '–' if x is None else f"{100 * x:.1f}"


def render(res:dict) -> str:
    rs, fg = res['recipes'], res.get('figures', {})
    st = rs['setup']
    L = ["# Quality on a real backbone", "",
         "Every figure here comes from mobilenet_v2 started from the ImageNet weights in `../shared/weights/mobilenet_v2_imagenet.pth`",
         "(`--weights-path`), trained and measured on real photos: `food-101-mini` (10 Food-101 classes, 450 train / 150 test) and",
         "`indian-dishes-mini` (6 Indian dishes, 270 train / 90 test). The validation split is 20 % of each training split;",
         "test top-1 is on the test split, which training never sees. CPU only (2 cores), batch 32,",
         f"{st['epochs']} epochs, seeds 0..{st['seeds'] - 1}. Regenerate: `{st['command']}`, then",
         f"`{fg.get('command', 'python bench/quality.py figures')}` and `python bench/quality.py doc` (results: `bench/results/quality.json`).", "",
         "For scale: a linear probe (logistic regression) on the frozen backbone's features reaches 0.760 (food-101-mini) and",
         "0.967 (indian-dishes-mini); chance is 0.100 and 0.167.", "",
         "## Recipes", "", "| recipe | what it changes |", "|---|---|"]
    recs = [r for r in RECIPES if r in rs.get('food-101-mini', {})]
    L += [f"| `{r}` | {RECIPE_TEXT[r]} |" for r in recs]
    L += ["", "| recipe | food-101-mini test top-1 (%) | wall s | indian-dishes-mini test top-1 (%) | wall s | food ECE before → after T |",
          "|---|---|---|---|---|---|"]
    def ms(ds, r, key='test_top1', scale=100):
        v = [x[key] for x in rs.get(ds, {}).get(r, {}).values() if x.get(key) is not None]
        if not v: return '–'
        return f"{scale * statistics.mean(v):.1f} ± {scale * (statistics.stdev(v) if len(v) > 1 else 0):.1f}" if scale == 100 else f"{statistics.mean(v):.0f}"
    for r in recs:
        ece = lambda k: statistics.mean(x[k] for x in rs['food-101-mini'][r].values())
        L.append(f"| `{r}` | {ms('food-101-mini', r)} | {ms('food-101-mini', r, 'seconds', 1)} | {ms('indian-dishes-mini', r)} | "
                 f"{ms('indian-dishes-mini', r, 'seconds', 1)} | {ece('ece_before'):.3f} → {ece('ece_after'):.3f} |")
    mean = lambda ds, r: 100 * statistics.mean(x['test_top1'] for x in rs[ds][r].values())
    best = best_recipe(res)
    gains = {ds: mean(ds, best) - mean(ds, 'design') for ds in DATASETS if best in rs.get(ds, {}) and 'design' in rs.get(ds, {})}
    L += ["", f"mean ± sample standard deviation over {st['seeds']} seeds. **Recommended: `{best}`** (best mean on food-101-mini): "
          + ', '.join(f"{g:+.1f} points over `design` on {ds}" for ds, g in gains.items()) + ".",
          "ECE (15 bins) is on the 150 food test photos, before and after the temperature fitted on the 90 validation photos:",
          "it corrects the head-only recipe's underconfidence and leaves already calibrated models about where they were;",
          "with 150 photos, differences of a few hundredths are noise.", ""]
    if fg:
        L += [f"## The other figures (recipe `{fg['recipe']}`, food-101-mini unless named)", ""]
    if 'exports' in fg:
        e = fg['exports']
        L += ["### Exports: the same model, four ways", "", "| | eager | TorchScript | ONNX | int8 (ONNX Runtime static) |", "|---|---|---|---|---|",
              f"| test top-1 (%) | {pct(e['eager'])} | {pct(e['torchscript'])} | {pct(e['onnx'])} | {pct(e['int8'])} |",
              f"| file MB | – | {e['torchscript_mb']:.1f} | {e['onnx_mb']:.1f} | {e['int8_mb']:.1f} |", "",
              f"int8 loses {100 * (e['eager'] - e['int8']):.1f} points (target ≤ 1) on {e['test_images']} test photos (one photo = "
              f"{100 / e['test_images']:.2f} points).", ""]
    if 'pruning' in fg:
        L += ["### Pruning (L1, layer by layer, the classifier head dense)", "", "| amount | --prune-epochs | test top-1 before → after (%) | sparsity | gzip MB before → after |",
              "|---|---|---|---|---|"]
        L += [f"| {r['amount']:.0%} | {r['prune_epochs']} | {pct(r['top1_before'])} → {pct(r['top1_after'])} | {r['sparsity']:.0%} | "
              f"{r['gzip_mb_before']:.1f} → {r['gzip_mb_after']:.1f} |" for r in fg['pruning']]
        L.append("")
    if 'ensemble' in fg:
        e = fg['ensemble']
        L += ["### Ensemble of the 3 seeds", "", f"members: {', '.join(pct(m) for m in e['members'])} %; best member {pct(e['best_member'])} %; "
              f"ensemble (mean of calibrated probabilities) **{pct(e['ensemble'])} %** ({100 * (e['ensemble'] - e['best_member']):+.1f} points).", ""]
    if 'gradcam' in fg:
        g = fg['gradcam']
        L += ["### Grad-CAM deletion curve", "",
              "The most salient pixels first (Grad-CAM of the predicted class, 7 × 7 upsampled) replaced by the mean colour in steps of",
              "10 %; the same with random 7 × 7 maps upsampled alike. Lower area = the map found what the model uses.", "",
              "| pixels removed (%) | " + ' | '.join(str(10 * i) for i in range(len(g['cam_curve']))) + " | area |",
              "|---|" + '---|' * (len(g['cam_curve']) + 1),
              "| Grad-CAM top-1 (%) | " + ' | '.join(pct(v) for v in g['cam_curve']) + f" | **{g['cam_auc']:.3f}** |",
              "| random top-1 (%) | " + ' | '.join(pct(v) for v in g['random_curve']) + f" | {g['random_auc']:.3f} |", ""]
    if 'mining' in fg:
        m = fg['mining']
        ks = list(m['loss'])
        L += ["### Mining with 10 % of the training labels flipped", "",
              f"{m['flipped']} of {m['train_images']} training photos relabelled at random (base rate {m['base_rate']:.0%}); a model trained on them "
              f"(test top-1 {pct(m['model_test_top1'])} %) ranks every training photo.", "",
              "| ranking | " + ' | '.join(f"precision@{k}" for k in ks) + " |", "|---|" + '---|' * len(ks),
              "| loss under the given label (top losses) | " + ' | '.join(f"{m['loss'][k]:.0%}" for k in ks) + " |",
              "| entropy (`nutrilearn-mine`, needs no label) | " + ' | '.join(f"{m['entropy'][k]:.0%}" for k in ks) + " |", ""]
    if 'forgetting' in fg:
        L += ["### Adding dishes: forgetting with and without rehearsal", "",
              "`--init-from` the old model, then train on the new classes' photos, with `--rehearsal-fraction` of each epoch drawn from",
              "the old classes' training photos (`--rehearsal-dir`); old-class test top-1 before and after, new-class test top-1.", "",
              "| case | --rehearsal-fraction | old classes before → after (%) | lost (points) | new classes (%) |", "|---|---|---|---|---|"]
        L += [f"| {r['case']} | {r['rehearsal_fraction']} | {pct(r['old_before'])} → {pct(r['old_after'])} | {r['forgetting_points']:.1f} | "
              f"{pct(r['new_class_acc'])} |" for r in fg['forgetting']['rows']]
        L.append("")
    return '\n'.join(L)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('step', choices=['recipes', 'figures', 'doc'])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--recipes', type=lambda s: s.split(','), default=['design', 'head', 'fine-tune'])
    p.add_argument('--datasets', type=lambda s: s.split(','), default=list(DATASETS))
    p.add_argument('--recipe', help='figures: the recipe whose models are used (default: the best on food-101-mini)')
    p.add_argument('--only', type=lambda s: s.split(','), help='figures: a subset of exports,pruning,ensemble,gradcam,mining,forgetting')
    p.add_argument('--work', type=Path, default=Path('/tmp/nutrilearn-quality'))
    a = p.parse_args()
    if not WEIGHTS.is_file(): raise SystemExit(f"{WEIGHTS} is missing (see ../shared/weights/SOURCES.md)")
    if a.step == 'recipes': run_recipes(a)
    elif a.step == 'figures': run_figures(a)
    DOC.parent.mkdir(exist_ok=True); DOC.write_text(render(load()) + '\n'); print(f"wrote {DOC}")


if __name__ == '__main__':
    main()
