"""SWResNet: SW on chosen norm layers of the mmdet and mmseg ResNet."""
import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from mmsn import SwitchWhiten2d  # noqa: E402
from mmsn.layers.placement import resolve_placement  # noqa: E402

# The SW release's ResNet-50 names its 7 SW layers so (REFERENCE.md, section 2).
RELEASE_SW7 = ['sw1', 'layer1.1.sw2', 'layer2.1.sw2', 'layer2.3.sw2', 'layer3.1.sw2',
               'layer3.3.sw2', 'layer3.5.sw2']


def build(scope, **cfg):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(scope)
    return MODELS.build(dict(type='SWResNet', **cfg))


def sw_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, SwitchWhiten2d)]


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_imagenet_placement_is_the_release_one(scope):
    model = build(scope, depth=50, norm_cfg=dict(type='BN'), frozen_stages=-1)
    assert sw_names(model) == RELEASE_SW7 == model.sw_layer_names
    assert model.norm1 is model.sw1 and model.layer2[3].norm2 is model.layer2[3].sw2
    keys = list(model.state_dict())
    # the replaced layer keeps its place: conv1, sw1, then layer1 (state-dict order)
    assert keys.index('sw1.weight') < keys.index('layer1.0.conv1.weight')
    assert 'layer1.0.bn2.weight' in keys and 'layer1.1.bn2.weight' not in keys
    out = model(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in out).backward()
    assert model.sw1.sw_mean_weight.grad is not None


def test_segmentation_placement_has_14_layers_outside_the_last_stage():
    model = build('mmseg', depth=50, norm_cfg=dict(type='BN'), sw_layers='segmentation',
                  sw_cfg=dict(type='SW', sw_type=5, num_pergroup=16),
                  dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1))
    names = sw_names(model)
    assert len(names) == 14 and names[0] == 'sw1' and not any('layer4' in n for n in names)
    assert all(model.get_submodule(n).sw_type == 5 for n in names)


def test_explicit_paths_frozen_stages_and_resnet18():
    model = build('mmdet', depth=18, base_channels=16, norm_cfg=dict(type='BN'),
                  frozen_stages=1, norm_eval=False, sw_cfg=dict(type='SW', num_pergroup=8),
                  sw_layers=['norm1', 'layer1.0.norm2', 'layer2.0.downsample.1'])
    assert model.sw_layer_names == ['sw1', 'layer1.0.sw2', 'layer2.0.downsample.1']
    assert isinstance(model.layer2[0].downsample[1], SwitchWhiten2d)
    # stem and stage 1 are frozen, the new layers there too; stage 2 is not
    assert not any(p.requires_grad for p in model.sw1.parameters())
    assert not any(p.requires_grad for p in model.layer1[0].sw2.parameters())
    assert all(p.requires_grad for p in model.layer2[0].downsample[1].parameters())
    model.train()
    assert not model.sw1.training and model.layer2[0].downsample[1].training
    assert resolve_placement('imagenet', 18) == ['norm1', 'layer1.1.norm2', 'layer2.1.norm2',
                                                 'layer3.1.norm2']


@pytest.mark.parametrize('kwargs,match', [
    (dict(sw_layers='detection'), "sw_layers: expected one of"),
    (dict(sw_layers=['layer9.0.norm2']), "sw_layers: 'layer9.0.norm2' names no module"),
    (dict(sw_layers=['layer1.0.conv2']), "not a norm layer"),
    (dict(sw_layers=[]), 'non-empty list'),
    (dict(sw_cfg=dict(type='SW', num_pergroup=48)), 'num_pergroup: expected a divisor'),
])
def test_bad_placements_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build('mmdet', depth=50, norm_cfg=dict(type='BN'), **kwargs)


def test_deep_stem_needs_explicit_stem_paths():
    with pytest.raises(ValueError, match='deep_stem'):
        build('mmseg', depth=50, deep_stem=True)
    model = build('mmseg', depth=50, deep_stem=True, sw_layers=['stem.1', 'layer1.0.norm2'])
    assert sw_names(model) == ['stem.1', 'layer1.0.sw2']
