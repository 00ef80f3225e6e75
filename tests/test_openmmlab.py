"""The layers inside the OpenMMLab machinery: registry, backbones, norm_eval, weight decay,
sync_bn, fuse_conv_bn and checkpoint loading."""
import pytest
import torch
from torch import nn

import mmsn  # noqa: F401  (registers the layers)
from mmsn import (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchWhiten2d, SyncSwitchNorm,
                  SyncSwitchWhiten2d)
from mmsn.layers import SwitchableLayer

mmcv_cnn = pytest.importorskip('mmcv.cnn')
from mmengine.registry import MODELS  # noqa: E402


def count_layers(model):
    counts = {}
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, SwitchableLayer)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


@pytest.mark.parametrize('type_name,cls,abbr', [
    ('SN', SwitchNorm2d, 'sn'), ('SN1d', SwitchNorm1d, 'sn'), ('SN2d', SwitchNorm2d, 'sn'),
    ('SN3d', SwitchNorm3d, 'sn'), ('SyncSN', SyncSwitchNorm, 'sn'), ('SW', SwitchWhiten2d, 'sw'),
    ('SyncSW', SyncSwitchWhiten2d, 'sw')])
def test_build_norm_layer_names_and_options(type_name, cls, abbr):
    name, layer = mmcv_cnn.build_norm_layer(dict(type=type_name, requires_grad=False), 64,
                                            postfix=1)
    assert name == f'{abbr}1' and type(layer) is cls and layer.num_features == 64
    assert layer.eps == 1e-5 and not any(p.requires_grad for p in layer.parameters())
    _, sw = mmcv_cnn.build_norm_layer(dict(type='SW', sw_type=5, num_pergroup=8, T=3), 64)
    assert (sw.sw_type, sw.num_pergroup, sw.T) == (5, 8, 3)
    assert MODELS.get(type_name) is cls


def test_registry_is_reachable_from_mmdet_and_mmseg_scopes():
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    assert DET_MODELS.get('SN') is SwitchNorm2d and SEG_MODELS.get('SyncSW') is SyncSwitchWhiten2d


def tiny_backbones():
    from mmdet.models.backbones import ResNet as DetResNet
    from mmseg.models.backbones import ResNetV1c
    yield 'mmdet-r18', lambda norm_cfg, **kw: DetResNet(18, norm_cfg=norm_cfg, **kw)
    yield 'mmdet-r50', lambda norm_cfg, **kw: DetResNet(50, norm_cfg=norm_cfg, **kw)
    yield 'mmseg-r18v1c', lambda norm_cfg, **kw: ResNetV1c(depth=18, norm_cfg=norm_cfg,
                                                           dilations=(1, 1, 2, 4),
                                                           strides=(1, 2, 1, 1), **kw)


@pytest.mark.parametrize('norm_cfg,layer_name', [
    (dict(type='SN'), 'SwitchNorm2d'), (dict(type='SyncSN'), 'SyncSwitchNorm'),
    (dict(type='SW', num_pergroup=16), 'SwitchWhiten2d')])
def test_resnets_build_and_train_with_switchable_norms(norm_cfg, layer_name):
    for name, build in tiny_backbones():
        model = build(norm_cfg)
        counts = count_layers(model)
        assert set(counts) == {layer_name}, (name, counts)
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        assert torch.isfinite(x.grad).all()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_norm_eval_freezes_switchable_layers():
    for name, build in tiny_backbones():
        model = build(dict(type='SN'), norm_eval=True)
        model.train()
        layers = [m for m in model.modules() if isinstance(m, SwitchableLayer)]
        assert layers and not any(m.training for m in layers), name
        running = layers[0].running_mean.clone()
        model(torch.randn(2, 3, 32, 32))
        assert torch.equal(layers[0].running_mean, running), name  # frozen statistics
        model = build(dict(type='SN'), norm_eval=False)
        model.train()
        assert all(m.training for m in model.modules() if isinstance(m, SwitchableLayer))


def test_norm_decay_mult_applies_to_switchable_parameters():
    from mmengine.optim import DefaultOptimWrapperConstructor
    model = nn.Sequential(nn.Conv2d(3, 16, 3), SwitchNorm2d(16),
                          SwitchWhiten2d(16, num_pergroup=8), nn.BatchNorm2d(16))
    constructor = DefaultOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4)),
        paramwise_cfg=dict(norm_decay_mult=0.))
    optimizer = constructor(model).optimizer
    decay = {id(p): group['weight_decay'] for group in optimizer.param_groups
             for p in group['params']}
    assert decay[id(model[0].weight)] == 1e-4
    for layer in model[1:]:
        for name, param in layer.named_parameters():
            assert decay[id(param)] == 0, name
    # Without norm_decay_mult the papers' parameters decay like everything else.
    default = DefaultOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4)))(model)
    assert all(group['weight_decay'] == 1e-4 for group in default.optimizer.param_groups)


def test_sync_bn_conversion_and_fuse_conv_bn_leave_switchable_layers_intact():
    from mmcv.cnn import fuse_conv_bn
    from mmengine.model import convert_sync_batchnorm, revert_sync_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 16, 3), SwitchNorm2d(16), nn.Conv2d(16, 16, 1),
                          SwitchWhiten2d(16, num_pergroup=8), nn.Conv2d(16, 16, 1),
                          nn.BatchNorm2d(16))
    model(torch.randn(2, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is SwitchNorm2d and type(converted[3]) is SwitchWhiten2d
    assert type(converted[5]) is nn.SyncBatchNorm  # BN is converted as before
    reverted = revert_sync_batchnorm(converted)
    fused = fuse_conv_bn(reverted)
    assert type(fused[1]) is SwitchNorm2d and type(fused[3]) is SwitchWhiten2d
    assert isinstance(fused[5], nn.Identity)  # the BN after the last conv was folded
    for key in ('1.mean_weight', '1.running_var', '3.running_cov'):
        assert torch.equal(fused.state_dict()[key], state[key])
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_mmengine_checkpoints_load_under_weights_only_torch(tmp_path):
    import warnings

    import numpy as np
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import load_checkpoint, save_checkpoint
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SwitchNorm2d(8))
    meta = dict(epoch=np.int64(3), loss=np.float32(0.5), arr=np.arange(3))
    save_checkpoint(dict(state_dict=model.state_dict(), meta=meta), str(tmp_path / 'a.pth'))
    clone = nn.Sequential(nn.Conv2d(3, 8, 1), SwitchNorm2d(8))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # numpy meta is allowed as safe: no fallback
        ckpt = load_checkpoint(clone, str(tmp_path / 'a.pth'), strict=True)
    assert int(ckpt['meta']['epoch']) == 3
    for key, value in model.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value)
    # A resumable checkpoint holds mmengine objects: loaded, with a warning naming the file.
    hub = dict(log_scalars=dict(loss=HistoryBuffer([1.0, 2.0], [1, 1])))
    save_checkpoint(dict(state_dict=model.state_dict(), message_hub=hub), str(tmp_path / 'b.pth'))
    with pytest.warns(UserWarning, match=r'b\.pth with weights_only=False'):
        ckpt = load_checkpoint(clone, str(tmp_path / 'b.pth'))
    assert ckpt['message_hub']['log_scalars']['loss'].current() == 2.0
