"Property tests for `nutrilearn_train.models`: heads, devices, freezing and weight loading (offline, CPU-friendly)."
import os, warnings
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torchvision import models as tvm

from nutrilearn_train.config import BACKBONE_BLOCKS, MODEL_NAMES
from nutrilearn_train.models import (BACKBONES, WeightsUnavailableError, build_head, build_model, count_parameters,
                                     freeze_layers, get_classifier, load_backbone_state_dict, load_backbone_weights,
                                     parameter_summary, pretrained_state_dict, replace_head)

N_STAGES = BACKBONE_BLOCKS   # blocks freeze_layers counts per backbone
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else []) + \
          (['mps'] if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available() else [])


@pytest.fixture(scope='module', autouse=True)
def no_downloads_one_thread():
    "Any download attempt fails the test (nothing may reach the network); one torch thread for these tiny tensors."
    def refuse(url, *a, **k): raise AssertionError(f"a test tried to download {url}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: a 2nd thread only adds sync cost, ~10x slower on a busy 2-core box
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, 'download_url_to_file', refuse)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def models():
    "Each backbone built once (random init, eval mode); tests swap only the head."
    torch.manual_seed(0)
    return {n: build_model(n, 10, pretrained=False).eval() for n in MODEL_NAMES}


def _frozen(model): return sum(p.numel() for p in model.parameters() if not p.requires_grad)
def _bn_params(model): return sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters())


# Property 1: the head has num_classes outputs, for every backbone.
@pytest.mark.parametrize('name', MODEL_NAMES)
@settings(max_examples=100, deadline=None)
@given(n=st.integers(10, 200))
def test_head_outputs_num_classes(models, name, n):
    m = replace_head(models[name], n)
    with torch.no_grad(): out = m(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, n)
    head = get_classifier(m)
    assert str(head) == str(build_head(name, n))  # the design's head: Dropout(0.2)+Linear(1280,n) / Linear(2048,n)
    lin = head if isinstance(head, nn.Linear) else head[1]
    assert (lin.in_features, lin.out_features) == (BACKBONES[name].in_features, n)


@pytest.mark.parametrize('name,n', [('mobilenet_v2', 101), ('efficientnet_b0', 10), ('resnet50', 200)])
def test_build_model_head(name, n):
    m = build_model(name, n, pretrained=False).eval()
    with torch.no_grad(): assert m(torch.randn(2, 3, 64, 64)).shape == (2, n)
    expected = 'Linear(in_features=2048' if name == 'resnet50' else 'Sequential(\n  (0): Dropout(p=0.2, inplace=False)\n  (1): Linear(in_features=1280'
    assert str(get_classifier(m)).startswith(expected)


# Property 8: model and batch work together on every available device.
@pytest.mark.parametrize('device', DEVICES)
@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(MODEL_NAMES), n=st.integers(10, 200), bs=st.integers(1, 2), size=st.sampled_from([32, 48]))
def test_forward_on_device(models, device, name, n, bs, size):
    m = replace_head(models[name].to(device), n)
    assert next(get_classifier(m).parameters()).device.type == device  # the new head follows the model
    with torch.no_grad(): out = m(torch.randn(bs, 3, size, size, device=device))
    assert out.shape == (bs, n) and out.device.type == device and torch.isfinite(out).all()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_train_step_on_device(models, device, name):
    "One SGD step on `device`: gradients live there and the head's weights change."
    m = replace_head(models[name].to(device).train(), 10)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = get_classifier(m).state_dict()
    before = {k: v.clone() for k, v in before.items()}
    loss = nn.functional.cross_entropy(m(torch.randn(2, 3, 64, 64, device=device)), torch.tensor([0, 1], device=device))
    loss.backward(); opt.step()
    g = next(get_classifier(m).parameters()).grad
    assert g is not None and g.device.type == device
    assert any(not torch.equal(v, before[k]) for k, v in get_classifier(m).state_dict().items())
    m.zero_grad(set_to_none=True); m.eval()


# freeze_layers: the head is always trainable; freezing more blocks never leaves more trainable parameters.
@pytest.mark.parametrize('train_bn', [True, False])
@settings(max_examples=100, deadline=None)
@given(data=st.data(), name=st.sampled_from(MODEL_NAMES))
def test_freeze_head_trainable_and_monotone(models, train_bn, data, name):
    m, n = models[name], N_STAGES[name]
    ks = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=4)))
    frozen = []
    for k in ks:
        freeze_layers(m, k, train_bn=train_bn)
        assert all(p.requires_grad for p in get_classifier(m).parameters())
        frozen.append(_frozen(m))
    assert frozen == sorted(frozen), (ks, frozen)
    freeze_layers(m, -1, train_bn=train_bn)  # -1 = the whole backbone: at least as much as any k
    tr, tot = count_parameters(m)
    head = sum(p.numel() for p in get_classifier(m).parameters())
    assert tr == head + (_bn_params(m) if train_bn else 0) and _frozen(m) >= frozen[-1]
    freeze_layers(m, 0)  # absolute, not cumulative: 0 unfreezes everything
    assert count_parameters(m) == (tot, tot)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(MODEL_NAMES), k=st.one_of(st.integers(-50, -2), st.integers(20, 50)))
def test_freeze_rejects_out_of_range(models, name, k):
    with pytest.raises(ValueError, match=rf"1\.\.{N_STAGES[name]} \(first blocks of {name}\), got {k}"):
        freeze_layers(models[name], k)


def test_freeze_stage_boundaries(models):
    m = models['resnet50']
    freeze_layers(m, 4)  # stem + layer1's three bottlenecks
    assert not m.conv1.weight.requires_grad and not m.layer1[2].conv1.weight.requires_grad and not m.bn1.weight.requires_grad
    assert m.layer2[0].conv1.weight.requires_grad and m.fc.weight.requires_grad
    assert parameter_summary(m).startswith('resnet50: ') and 'parameters trainable' in parameter_summary(m)
    freeze_layers(m, 0)


# Weight loading: every key the file and the model disagree on is reported, never silently dropped.
@pytest.fixture(scope='module')
def mnv2_source():
    torch.manual_seed(1)
    return tvm.mobilenet_v2().state_dict()  # the ImageNet model's layout: 1000-class head


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_load_reports_missing_and_unexpected(models, mnv2_source, data):
    m = replace_head(models['mobilenet_v2'], 10)
    head_before = {k: v.clone() for k, v in get_classifier(m).state_dict().items()}
    body = [k for k in mnv2_source if not k.startswith('classifier.') and not k.endswith('num_batches_tracked')]
    dropped = data.draw(st.sets(st.sampled_from(body), max_size=5))
    added = data.draw(st.sets(st.from_regex(r'bogus\.[a-z]{1,8}', fullmatch=True), max_size=3))
    sd = {k: v for k, v in mnv2_source.items() if k not in dropped} | {k: torch.zeros(2) for k in added}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r = load_backbone_state_dict(m, sd, 'mobilenet_v2')
    assert r == dict(missing=sorted(dropped), unexpected=sorted(added), ignored_head=['classifier.1.bias', 'classifier.1.weight'])
    assert any('missing keys' in str(x.message) for x in w) == bool(dropped or added)
    own = m.state_dict()
    assert all(torch.equal(own[k], mnv2_source[k]) for k in body if k not in dropped)
    assert all(torch.equal(v, head_before[k]) for k, v in get_classifier(m).state_dict().items())


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_weights_path_loads_torchvision_pth(tmp_path, name):
    torch.manual_seed(2)
    src = BACKBONES[name].builder(weights=None, num_classes=1000).state_dict()
    torch.save(src, tmp_path/'imagenet.pth')
    head = BACKBONES[name].head + '.'
    m = build_model(name, 10, pretrained=True, weights_path=tmp_path/'imagenet.pth')  # weights_path wins: no download
    own = m.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in own.items() if not k.startswith(head))
    assert get_classifier(m)(torch.zeros(1, BACKBONES[name].in_features)).shape == (1, 10)


@pytest.mark.parametrize('wrap', [lambda sd: {'state_dict': sd}, lambda sd: {'model': sd},
                                  lambda sd: {'model_state_dict': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 4, 'best_acc': 0.7}])
def test_weights_path_unwraps_checkpoints(tmp_path, mnv2_source, wrap):
    torch.save(wrap(mnv2_source), tmp_path/'ck.pth')
    m = build_model('mobilenet_v2', 5, pretrained=False)
    r = load_backbone_weights(m, tmp_path/'ck.pth', 'mobilenet_v2')
    assert (r['missing'], r['unexpected']) == ([], [])
    assert torch.equal(m.features[3].conv[0][0].weight, mnv2_source['features.3.conv.0.0.weight'])


def test_weights_path_errors(tmp_path, models):
    m = models['mobilenet_v2']
    with pytest.raises(FileNotFoundError, match='does not exist'): load_backbone_weights(m, tmp_path/'nope.pth', 'mobilenet_v2')
    torch.save(tvm.resnet50().state_dict(), tmp_path/'r50.pth')
    with pytest.raises(ValueError, match='is it another backbone'): load_backbone_weights(m, tmp_path/'r50.pth', 'mobilenet_v2')
    torch.save(nn.Linear(2, 2), tmp_path/'pickled.pth')
    with pytest.raises(ValueError, match='not a weights-only torch file'): load_backbone_weights(m, tmp_path/'pickled.pth', 'mobilenet_v2')


# Pretrained weights: cache hit works offline; cache miss offline raises a helpful WeightsUnavailableError.
def test_pretrained_offline_raises_helpful_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))  # empty cache
    def offline(url, *a, **k): raise URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    for name in MODEL_NAMES:
        with pytest.raises(WeightsUnavailableError) as e: build_model(name, 10)
        msg = str(e.value)
        assert isinstance(e.value, RuntimeError) and '--weights-path' in msg and '--no-pretrained' in msg
        assert os.path.basename(BACKBONES[name].weights.url) in msg and str(tmp_path) in msg
    assert not any(tmp_path.rglob('*.pth'))


def test_pretrained_uses_cache_without_network(tmp_path, monkeypatch, mnv2_source):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cache = tmp_path/'hub'/'checkpoints'
    cache.mkdir(parents=True)
    torch.save(mnv2_source, cache/os.path.basename(BACKBONES['mobilenet_v2'].weights.url))
    m = build_model('mobilenet_v2', 12)  # the module-wide guard fails this if it tries to download
    assert torch.equal(m.features[0][0].weight, mnv2_source['features.0.0.weight'])
    assert get_classifier(m)[1].out_features == 12
    assert pretrained_state_dict('mobilenet_v2', progress=False).keys() == mnv2_source.keys()
