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


@pytest.mark.slow
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


def assert_norm_eval_freezes(model, name):
    model.train()
    layers = [m for m in model.modules() if isinstance(m, SwitchableLayer)]
    assert layers and not any(m.training for m in layers), name
    running = layers[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(layers[0].running_mean, running), name  # frozen statistics


@pytest.mark.parametrize('scope,cfg', [
    ('mmdet', dict(type='ResNet', depth=18)),
    ('mmseg', dict(type='ResNetV1c', depth=18, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)))])
def test_norm_eval_freezes_switchable_layers_of_registry_built_backbones(scope, cfg):
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(cfg, norm_cfg=dict(type='SN'), norm_eval=True))
        assert_norm_eval_freezes(model, scope)
        model = MODELS.build(dict(cfg, norm_cfg=dict(type='SN'), norm_eval=False))
    model.train()
    assert all(m.training for m in model.modules() if isinstance(m, SwitchableLayer))


def test_norm_eval_of_a_users_backbone_registered_after_import():
    """A class registered after ``import mmsn`` (none of mmdet's) is handled at build time,
    like mmdet's: its own ``train`` reads ``norm_eval`` and looks for ``_BatchNorm``."""

    class TinyUserBackbone(nn.Module):
        def __init__(self, norm_cfg, norm_eval=False):
            super().__init__()
            self.norm_eval = norm_eval
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = mmcv_cnn.build_norm_layer(norm_cfg, 8)[1]

        def forward(self, x):
            return self.norm(self.conv(x))

        def train(self, mode=True):
            super().train(mode)
            if mode and self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            return self

    MODELS.register_module(module=TinyUserBackbone, force=True)
    try:
        frozen = MODELS.build(dict(type='TinyUserBackbone', norm_cfg=dict(type='SN'),
                                   norm_eval=True))
        assert_norm_eval_freezes(frozen, 'user backbone')
        bn = MODELS.build(dict(type='TinyUserBackbone', norm_cfg=dict(type='BN'),
                               norm_eval=True)).train()
        assert not bn.norm.training  # BN as before
        trained = MODELS.build(dict(type='TinyUserBackbone', norm_cfg=dict(type='SN')))
        assert trained.train().norm.training
    finally:
        MODELS.module_dict.pop('TinyUserBackbone')


def test_norm_eval_of_a_model_built_by_hand_needs_patch_norm_eval():
    from mmdet.models.backbones import ResNet

    class HandBuilt(ResNet):  # a class no registry build has seen
        pass

    from mmsn.mm import patch_norm_eval
    model = HandBuilt(18, norm_cfg=dict(type='SN'), norm_eval=True)
    assert patch_norm_eval(model) in ([ResNet], [])  # ResNet may be patched already
    assert_norm_eval_freezes(model, 'hand built')


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


def test_mmengine_checkpoints_load_with_weights_only_and_no_fallback(tmp_path):
    import warnings

    import numpy as np
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import load_checkpoint, save_checkpoint
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SwitchNorm2d(8))
    meta = dict(epoch=np.int64(3), loss=np.float32(0.5), arr=np.arange(3),
                dtype=np.dtype('float16'))
    hub = dict(log_scalars=dict(loss=HistoryBuffer([1.0, 2.0], [1, 1])),
               runtime_info=dict(eta=np.float64(1.5)))
    save_checkpoint(dict(state_dict=model.state_dict(), meta=meta, message_hub=hub),
                    str(tmp_path / 'a.pth'))
    clone = nn.Sequential(nn.Conv2d(3, 8, 1), SwitchNorm2d(8))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no fallback, no warning
        ckpt = load_checkpoint(clone, str(tmp_path / 'a.pth'), strict=True)
    assert int(ckpt['meta']['epoch']) == 3 and ckpt['meta']['dtype'] == np.float16
    assert ckpt['message_hub']['log_scalars']['loss'].mean() == 1.5
    for key, value in model.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value)


class _RunsCodeOnLoad:
    """A pickle whose loading calls a function of the file's choosing."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))  # creates the marker file when unpickled


@pytest.mark.parametrize('via', ['mmengine', 'mmsn'])
def test_a_checkpoint_that_runs_code_is_refused_unless_trusted(tmp_path, monkeypatch, via):
    from mmengine.runner import load_checkpoint

    from mmsn.checkpoint import (TRUSTED_CHECKPOINTS_ENV, UntrustedCheckpointError,
                                 load_checkpoint_file)
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save(dict(state_dict=nn.Conv2d(3, 8, 1).state_dict(), meta=_RunsCodeOnLoad(marker)),
               path)
    load = ((lambda: load_checkpoint(nn.Conv2d(3, 8, 1), str(path))) if via == 'mmengine'
            else (lambda: load_checkpoint_file(str(path))))
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    with pytest.raises(UntrustedCheckpointError,
                       match=rf'global io.open.*{TRUSTED_CHECKPOINTS_ENV}=.*evil\.pth'):
        load()
    assert not marker.exists()  # its function never ran
    # Another file listed as trusted does not trust this one.
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, str(tmp_path / 'other.pth'))
    with pytest.raises(UntrustedCheckpointError):
        load()
    assert not marker.exists()
    # Trusted by path: the user's explicit choice, loaded as torch < 2.6 would.
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, f'{tmp_path / "other.pth"}:{path}')
    load()
    assert marker.exists()


def test_history_buffer_getattr_resolves_only_its_statistics(tmp_path):
    from mmengine.logging import HistoryBuffer

    from mmsn.checkpoint import UntrustedCheckpointError, load_checkpoint_file

    class AsksForInit:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))

    torch.save(dict(meta=AsksForInit()), tmp_path / 'x.pth')
    with pytest.raises(UntrustedCheckpointError, match='only the HistoryBuffer statistics'):
        load_checkpoint_file(str(tmp_path / 'x.pth'))


@pytest.mark.slow
def test_import_mmsn_imports_neither_mmdet_nor_mmseg():
    import subprocess
    import sys
    code = ('import sys, mmsn\n'
            'from mmengine.registry import MODELS\n'
            'assert MODELS.get("SN") is mmsn.SwitchNorm2d\n'
            'print(sorted(m for m in ("mmdet", "mmseg", "mmcv") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == '[]'


@pytest.mark.slow
def test_tools_refuse_an_untrusted_checkpoint_and_load_it_with_trust_checkpoint(tmp_path):
    import importlib.util
    import os.path as osp
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        'harden_tool', osp.join(root, 'tools/analysis_tools/harden_ratios.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    marker = tmp_path / 'ran'

    class MakesADirectory:  # unpickles to None, so the tool can save what it loaded
        def __reduce__(self):
            import os
            return (os.makedirs, (str(marker),))

    torch.save(dict(state_dict=SwitchNorm2d(4).state_dict(), extra=MakesADirectory()),
               tmp_path / 'in.pth')
    argv = [str(tmp_path / 'in.pth'), str(tmp_path / 'out.pth')]
    assert tool.main(argv) == 1
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()
    assert tool.main(argv + ['--trust-checkpoint']) == 0
    assert marker.exists() and (tmp_path / 'out.pth').exists()


@pytest.mark.slow
def test_a_refused_file_leaves_history_buffer_class_state_alone(tmp_path):
    """HistoryBuffer.__setstate__ writes into a class attribute; a file must not change it
    for the whole process, refused or not."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    from mmsn.checkpoint import UntrustedCheckpointError, load_checkpoint_file
    before = dict(HistoryBuffer._statistics_methods)
    poisoned = HistoryBuffer([1.0], [1])
    poisoned.__dict__['statistics_methods'] = {'mean': np.arange(3)}

    class Pickled(HistoryBuffer):  # pickles as HistoryBuffer with the poisoned state
        def __reduce_ex__(self, protocol):
            return (HistoryBuffer.__new__, (HistoryBuffer,), dict(self.__dict__))

    carrier = Pickled([1.0], [1])
    carrier.__dict__.update(statistics_methods={'mean': np.arange(3)})
    torch.save(dict(hub=carrier, then=_RunsCodeOnLoad(tmp_path / 'ran')), tmp_path / 'x.pth')
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint_file(str(tmp_path / 'x.pth'))
    assert HistoryBuffer._statistics_methods == before
    assert HistoryBuffer([1.0, 3.0], [1, 1]).mean() == 2.0


@pytest.mark.slow
def test_swresnet_builds_from_the_root_registry_in_a_fresh_process():
    import subprocess
    import sys
    code = ('import mmsn\n'
            'from mmengine.registry import MODELS, init_default_scope\n'
            'cfg = dict(type="SWResNet", depth=18, base_channels=16, sw_layers=["norm1"], '
            'sw_cfg=dict(type="SW", num_pergroup=8), init_cfg=None)\n'
            'print(type(MODELS.build(dict(cfg, _scope_="mmdet"))).__mro__[1].__module__)\n'
            'init_default_scope("mmseg")\n'
            'print(type(MODELS.build(cfg)).__mro__[1].__module__)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ['mmdet.models.backbones.resnet',
                                  'mmseg.models.backbones.resnet']


@pytest.mark.slow
def test_loading_in_a_fresh_process_keeps_history_buffer_statistics(tmp_path):
    """Until a first HistoryBuffer is made the class's statistics table is empty; loading a
    checkpoint must leave the four defaults usable."""
    import subprocess
    import sys

    from mmengine.logging import HistoryBuffer
    from mmengine.runner import save_checkpoint
    save_checkpoint(dict(message_hub=dict(log_scalars=dict(
        loss=HistoryBuffer([1.0, 3.0], [1, 1])))), str(tmp_path / 'a.pth'))
    code = ('import mmsn\n'
            'from mmsn.checkpoint import load_checkpoint_file\n'
            f'hub = load_checkpoint_file({str(tmp_path / "a.pth")!r})["message_hub"]\n'
            'print(hub["log_scalars"]["loss"].statistics("mean"))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '2.0'


def test_random_state_survives_a_map_location_and_restores(tmp_path):
    """Checkpoints are loaded with map_location='cuda' on a GPU: the saved generator states
    are numpy arrays, which it leaves alone."""
    import random

    import numpy as np

    from mmsn.checkpoint import load_checkpoint_file
    from mmsn.mm.hooks import random_state, set_random_state
    torch.save(dict(state=random_state()), tmp_path / 'rng.pth')
    expected = (torch.rand(3), np.random.rand(3), random.random())
    saved = load_checkpoint_file(str(tmp_path / 'rng.pth'), map_location='meta')['state']
    set_random_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_configs_can_inherit_mmsn_configs_and_take_their_default_scope(tmp_path):
    """``mmsn::`` resolves as ``mmdet::`` does (mmengine's MODULE2PACKAGE gains one key, and
    nothing else changes); what mmengine marks ``_scope_='mmsn'`` takes the config's
    ``default_scope`` in mmsn's tools (mmsn has no registries of its own). Resolving the
    path needs the installed package: tests/test_package.py."""
    from mmengine.config import Config
    from mmengine.config.utils import MODULE2PACKAGE

    from mmsn.mm.launch import _rescope_inherited
    assert MODULE2PACKAGE['mmsn'] == 'mmsn' and MODULE2PACKAGE['mmdet'] == 'mmdet'
    cfg = Config(dict(default_scope='mmseg', hooks=[dict(type='A', _scope_='mmsn')],
                      model=dict(type='B', _scope_='mmdet', head=dict(type='C', _scope_='mmsn'))))
    _rescope_inherited(cfg._cfg_dict, cfg.default_scope)
    assert cfg.hooks[0]._scope_ == 'mmseg' and cfg.model._scope_ == 'mmdet'
    assert cfg.model.head._scope_ == 'mmseg'
