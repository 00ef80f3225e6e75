"""The checkpoint converter: the authors' SN / SSN / SW ImageNet ResNets (built here in their
layout) and BN ResNets become mmdet/mmseg backbones with the same features."""
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from mmsn.converters import ConversionError, convert_checkpoint  # noqa: E402
from mmsn.ops import SWConfig, switch_whiten  # noqa: E402
from mmsn.ops.sparsestmax import sparsestmax  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STAGES_50 = (3, 4, 6, 3)


class AuthorsSwitchNorm(nn.Module):
    """The SN release's layer (REFERENCE.md section 1): (1,C,1,1) affine, (3,) or (2,) logits
    (0 IN, 1 LN, 2 BN), (1,C,1) running buffers; SSN adds mean_fixed/var_fixed/radius and,
    once fixed, stores probabilities. Eval forward by the paper's Eqn. 2-3 (population
    variances): IN/LN from the input, BN from the running buffers."""

    def __init__(self, channels, using_bn=True, sparse=False):
        super().__init__()
        self.using_bn, self.sparse = using_bn, sparse
        self.weight = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(1, channels, 1, 1) * 0.1)
        entries = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.randn(entries))
        self.var_weight = nn.Parameter(torch.randn(entries))
        if using_bn:
            self.register_buffer('running_mean', torch.randn(1, channels, 1) * 0.1)
            self.register_buffer('running_var', torch.rand(1, channels, 1) + 0.5)
        if sparse:
            fixed = torch.randint(0, 2, (1,))
            self.register_buffer('mean_fixed', fixed)
            self.register_buffer('var_fixed', 1 - fixed)
            self.register_buffer('radius', torch.rand(1) * 0.8)
            for logits, flag in ((self.mean_weight, self.mean_fixed),
                                 (self.var_weight, self.var_fixed)):
                if flag.item():  # fixed: a one-hot probability vector
                    logits.data = F.one_hot(torch.randint(0, 3, ()), 3).float()

    def ratios(self, logits, fixed):
        if not self.sparse:
            return F.softmax(logits, 0)
        return logits if fixed.item() else sparsestmax(logits, self.radius.item()).float()

    def forward(self, x):
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        mean_in, var_in = flat.mean(-1, keepdim=True), flat.var(-1, keepdim=True, unbiased=False)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_ln ** 2
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.using_bn:
            means.append(self.running_mean)
            variances.append(self.running_var)
        mw = self.ratios(self.mean_weight, getattr(self, 'mean_fixed', None))
        vw = self.ratios(self.var_weight, getattr(self, 'var_fixed', None))
        mean = sum(w * m for w, m in zip(mw, means))
        var = sum(w * v for w, v in zip(vw, variances))
        return ((flat - mean) / (var + 1e-5).sqrt()).reshape_as(x) * self.weight + self.bias


class AuthorsSwitchWhiten(nn.Module):
    """The SW release's layer layout (REFERENCE.md section 2), sw_type 2; its eval forward is
    mmsn's reference op (SW numerics are tested against the paper elsewhere)."""

    def __init__(self, channels, per_group=16):
        super().__init__()
        self.per_group = per_group
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.sw_mean_weight = nn.Parameter(torch.randn(2))
        self.sw_var_weight = nn.Parameter(torch.randn(2))
        groups = channels // per_group
        self.register_buffer('running_mean', torch.randn(groups, per_group, 1) * 0.1)
        a = torch.randn(groups, per_group, per_group) * 0.2
        self.register_buffer('running_cov', a @ a.transpose(1, 2) + torch.eye(per_group))

    def forward(self, x):
        return switch_whiten(
            x, F.softmax(self.sw_mean_weight, 0), F.softmax(self.sw_var_weight, 0), self.weight,
            self.bias, self.running_mean, self.running_cov, torch.tensor(0),
            SWConfig(num_pergroup=self.per_group, sw_type=2, T=5, logits=False),
            use_batch_stats=False)


def random_bn(channels):
    bn = nn.BatchNorm2d(channels)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_(0, 0.1)
    bn.running_mean.normal_(0, 0.1)
    bn.running_var.uniform_(0.5, 1.5)
    return bn.eval()


class AuthorsBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.norm_names = []
        for k, channels in ((1, planes), (2, planes), (3, planes * 4)):
            abbr, layer = norm(k, channels)
            self.add_module(f'{abbr}{k}', layer)
            self.norm_names.append(f'{abbr}{k}')
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            norm('shortcut', planes * 4)[1])

    def forward(self, x):
        n1, n2, n3 = (getattr(self, name) for name in self.norm_names)
        out = F.relu(n1(self.conv1(x)))
        out = F.relu(n2(self.conv2(out)))
        out = n3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AuthorsResNet(nn.Module):
    """A torchvision-style ResNet v1 (stride on the 3x3 conv) with the release's names:
    ``conv1``, ``<abbr>1``, ``layerK.i.<abbr>J``, ``downsample.0/1``, ``fc``."""

    def __init__(self, norm, stages=STAGES_50, stem_abbr='sn'):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        abbr, layer = norm('stem', 64)
        self.add_module(f'{abbr}1', layer)
        self.stem_norm = f'{abbr}1'
        inplanes = 64
        for s, blocks in enumerate(stages):
            planes = 64 * 2 ** s
            layers = []
            for i in range(blocks):
                block_norm = lambda k, c, s=s, i=i: norm((s + 1, i, k), c)  # noqa: E731
                layers.append(AuthorsBottleneck(inplanes, planes, 2 if (i == 0 and s) else 1,
                                                block_norm))
                inplanes = planes * 4
            self.add_module(f'layer{s + 1}', nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.max_pool2d(F.relu(getattr(self, self.stem_norm)(self.conv1(x))), 3, 2, 1)
        outs = []
        for s in range(1, 5):
            x = getattr(self, f'layer{s}')(x)
            outs.append(x)
        return outs


def sn_norm(using_bn=True, sparse=False):
    return lambda where, c: ('sn', AuthorsSwitchNorm(c, using_bn, sparse))


def bn_norm(where, c):
    return 'bn', random_bn(c)


RELEASE_SW = {'stem', (1, 1, 2), (2, 1, 2), (2, 3, 2), (3, 1, 2), (3, 3, 2), (3, 5, 2)}


def sw_release_norm(where, c):
    return ('sw', AuthorsSwitchWhiten(c)) if where in RELEASE_SW else bn_norm(where, c)


def save_release(model, path, wrapper=True):
    state = {f'module.{k}': v for k, v in model.state_dict().items()}
    if wrapper:  # the releases' training checkpoint
        state = {'epoch': 100, 'model': 'resnet50', 'state_dict': state, 'best_prec1': 77.49,
                 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}}
    torch.save(state, path)


def build_backbone(scope, config, **kwargs):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(scope)
    return MODELS.build(dict(config, **kwargs))


def assert_same_features(authors, converted_path, config):
    # float64, so that 50 layers of float32 round-off cannot hide or fake a difference
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = authors.double().eval()(x)
    state = torch.load(converted_path, weights_only=True)['state_dict']
    for scope in ('mmdet', 'mmseg'):
        backbone = build_backbone(scope, config, init_cfg=None)
        backbone.load_state_dict(state, strict=True)
        backbone.double()
        backbone.eval()  # (mmdet/mmseg ResNet.train returns None: no chaining)
        with torch.no_grad():
            outs = backbone(x)
        for got, want in zip(outs, expected):
            # float32 tensors in both; SSN's ratios pass through float32 logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('variant', ['sn-8x32', 'sn-8x1', 'ssn', 'ssn-as-sn'])
def test_sn_release_converts_to_the_same_backbone(variant, tmp_path):
    torch.manual_seed(0)
    norm = {'sn-8x32': sn_norm(), 'sn-8x1': sn_norm(using_bn=False),
            'ssn': sn_norm(sparse=True), 'ssn-as-sn': sn_norm(sparse=True)}[variant]
    authors = AuthorsResNet(norm)
    src, dst = tmp_path / 'release.pth', tmp_path / 'converted.pth'
    save_release(authors, src, wrapper=variant != 'sn-8x1')  # (8,1): a bare state dict
    lines = []
    meta = convert_checkpoint(str(src), str(dst), ssn_as_sn=variant == 'ssn-as-sn',
                              log=lines.append)
    expected_cfg = {'sn-8x1': dict(type='SN', using_bn=False),
                    'ssn': dict(type='SSN')}.get(variant, dict(type='SN'))
    assert meta['backbone'] == dict(type='ResNet', depth=50, norm_cfg=expected_cfg)
    assert set(meta['dropped']) == {'fc.weight', 'fc.bias'}
    assert len(lines) == len(authors.state_dict()) + 1  # one per source tensor, then 'wrote'
    assert_same_features(authors, dst, meta['backbone'])


@pytest.mark.slow
def test_sw_release_converts_to_swresnet(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsResNet(sw_release_norm)
    src, dst = tmp_path / 'sw.pth', tmp_path / 'sw_mmsn.pth'
    save_release(authors, src)
    meta = convert_checkpoint(str(src), str(dst), log=lambda line: None)
    assert meta['backbone']['type'] == 'SWResNet' and meta['backbone']['sw_layers'] == 'imagenet'
    assert meta['source_layers'] == ['BN', 'SW']
    # the SW paper's 14-layer segmentation placement: 7 more SW layers start from BN
    seg = tmp_path / 'sw_seg.pth'
    meta = convert_checkpoint(str(src), str(seg), sw_layers='segmentation', log=lambda _: None)
    backbone = build_backbone('mmseg', meta['backbone'], init_cfg=None)
    state = torch.load(seg, weights_only=True)['state_dict']
    backbone.load_state_dict(state, strict=True)
    assert len(backbone.sw_layer_names) == 14
    source = authors.layer1[0].bn2  # BN in the release, SW in the destination
    torch.testing.assert_close(state['layer1.0.sw2.running_cov'].diagonal(dim1=1, dim2=2),
                               source.running_var.reshape(4, 16))
    assert torch.equal(state['layer1.0.sw2.sw_mean_weight'], torch.ones(2))
    assert torch.equal(state['layer1.1.sw2.running_cov'], authors.layer1[1].sw2.running_cov)
    assert_same_features(authors, dst, convert_checkpoint(str(src), str(dst),
                                                          log=lambda _: None)['backbone'])


def test_bn_model_becomes_sn_with_uniform_ratios(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsResNet(bn_norm)
    src, dst = tmp_path / 'bn.pth', tmp_path / 'bn_sn.pth'
    torch.save(authors.state_dict(), src)  # torchvision: bare, no prefix
    meta = convert_checkpoint(str(src), str(dst), log=lambda _: None)
    assert meta['backbone'] == dict(type='ResNet', depth=50, norm_cfg=dict(type='SN'))
    state = torch.load(dst, weights_only=True)['state_dict']
    build_backbone('mmdet', meta['backbone']).load_state_dict(state, strict=True)
    bn = authors.layer2[0].downsample[1]
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        assert torch.equal(state[f'layer2.0.downsample.1.{name}'], getattr(bn, name))
    assert torch.equal(state['layer3.2.sn2.mean_weight'], torch.ones(3))


def corrupt(state, how):
    if how == 'truncated':
        del state['module.layer2.1.sn2.var_weight']
    elif how == 'wrong-depth':
        for key in [k for k in state if k.startswith('module.layer3.5.')]:
            del state[key]
    elif how == 'v2':
        state['module.sn_out.weight'] = torch.ones(1, 2048, 1, 1)
    elif how == 'unknown-tensor':
        state['module.layer1.0.attention.weight'] = torch.ones(3)
    return state


@pytest.mark.parametrize('how,message', [
    ('truncated', 'layer2.1.sn2.var_weight: destination left unfilled'),
    ('wrong-depth', 'blocks per stage'),
    ('v2', 'pre-activation (v2)'),
    ('unknown-tensor', 'layer1.0.attention.weight (3,): no destination'),
    ('not-a-checkpoint', 'is not a PyTorch checkpoint'),
])
def test_malformed_sources_are_refused_and_nothing_is_written(how, message, tmp_path):
    torch.manual_seed(0)
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    if how == 'not-a-checkpoint':
        src.write_text('epoch,top1\n100,77.49\n')
    else:
        state = {f'module.{k}': v for k, v in AuthorsResNet(sn_norm()).state_dict().items()}
        torch.save({'state_dict': corrupt(state, how)}, src)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(str(src), str(dst), log=lambda _: None)
    assert any(message in problem for problem in error.value.problems), error.value.problems
    assert not dst.exists() and not osp.exists(f'{dst}.partial')


@pytest.mark.slow
def test_command_line_reports_and_exit_status(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsResNet(sn_norm())
    src, dst = tmp_path / 'ResNet50v1+SN(8,32)-77.49.pth', tmp_path / 'out' / 'r50_sn.pth'
    save_release(authors, src)
    tool = osp.join(ROOT, 'tools', 'model_converters', 'sn2mm.py')
    run = subprocess.run([sys.executable, tool, str(src), str(dst)], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(authors.state_dict()) + 1 and dst.exists()
    assert any(line.startswith('layer1.0.sn1.running_var') and '-> layer1.0.sn1.running_var'
               in line for line in lines)
    assert any(line.startswith('fc.weight') and 'dropped: classifier head' in line
               for line in lines)
    state = {f'module.{k}': v for k, v in authors.state_dict().items()}
    torch.save(corrupt(state, 'truncated'), tmp_path / 'bad.pth')
    run = subprocess.run([sys.executable, tool, str(tmp_path / 'bad.pth'),
                          str(tmp_path / 'bad_out.pth')], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 1 and 'nothing written' in run.stderr
    assert 'layer2.1.sn2.var_weight' in run.stderr and not (tmp_path / 'bad_out.pth').exists()


@pytest.mark.slow
@pytest.mark.parametrize('config,norm', [
    ('sn/mask-rcnn_r50-sn_fpn-sn_2x_coco.py', sn_norm()),
    ('sn/pspnet_r50-syncsn-d8_4xb2-80k_cityscapes-512x1024.py', sn_norm()),
    ('sw/mask-rcnn_r50-sw_fpn-syncbn_2x_coco.py', sw_release_norm),
])
def test_configs_load_the_converted_backbone(config, norm, tmp_path):
    from mmengine.config import Config
    torch.manual_seed(0)
    src, dst = tmp_path / 'release.pth', tmp_path / 'converted.pth'
    save_release(AuthorsResNet(norm), src)
    convert_checkpoint(str(src), str(dst), log=lambda _: None)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    cfg.model.backbone.init_cfg.checkpoint = str(dst)
    scope = 'mmdet' if 'rcnn' in config else 'mmseg'
    backbone = build_backbone(scope, cfg.model.backbone)
    backbone.init_weights()
    converted = torch.load(dst, weights_only=True)['state_dict']
    state = backbone.state_dict()
    assert set(state) == set(converted)
    assert all(torch.equal(state[k], converted[k]) for k in converted)
