"""What SN learns, seen and used: ratio hook and plots, batch-average statistics, hard ratios
and their deployment."""
import copy
import json
import os.path as osp
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmsn import SparseSwitchNorm2d, SwitchNorm2d, SwitchWhiten2d, SyncSwitchNorm
from mmsn.checkpoint import load_checkpoint_file
from mmsn.analysis import model_ratios, ratio_history, ratio_scalars, symmetric_kl
from mmsn.batch_average import batch_average_statistics
from mmsn.deploy import ChannelAffine, HardSwitchNorm, deploy_hard_switchable
from mmsn.hard_ratios import hard_choice, harden_ratios, harden_state_dict
from processes import spawn_ranks

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _scalars(path, records):
    path.parent.mkdir(parents=True)
    with open(path, 'w') as f:
        for step, value in records:
            f.write(json.dumps({'loss': 1.0, 'step': step}) + '\n')  # a record without ratios
            f.write(json.dumps({'ratios/sn1/mean_in': value, 'ratios/sn1/var_in': value,
                                'step': step}) + '\n')
    return str(path)


def test_ratio_history_of_several_runs_in_one_work_dir(tmp_path):
    """make demo run twice in one work dir (the first run stopped after 2 records): the
    second run starts over and its curve alone is drawn; a resumed run replaces the steps
    after its checkpoint. Every series stays as long as its steps (the plot tool failed with
    18 steps and 19 values)."""
    first = _scalars(tmp_path / 'a/vis_data/scalars.json', [(25, 0.1), (50, 0.2)])
    again = _scalars(tmp_path / 'b/vis_data/scalars.json', [(25, 0.3), (50, 0.4), (75, 0.5)])
    history = ratio_history([first, again])
    assert history['sn1'] == {'step': [25, 50, 75], 'mean_in': [0.3, 0.4, 0.5],
                              'var_in': [0.3, 0.4, 0.5]}
    resumed = _scalars(tmp_path / 'c/vis_data/scalars.json', [(50, 0.6), (75, 0.7), (100, 0.8)])
    history = ratio_history([first, resumed])
    assert history['sn1']['step'] == [25, 50, 75, 100]
    assert history['sn1']['mean_in'] == [0.1, 0.6, 0.7, 0.8]
    from mmsn.plotting import plot_ratio_curves
    assert plot_ratio_curves(history, str(tmp_path / 'plots'))


def test_ratio_scalars_and_divergence():
    layer = SwitchNorm2d(4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([2.0, 0.0, -1.0]))
    ratios = model_ratios(torch.nn.Sequential(layer))
    assert list(ratios) == ['0'] and ratios['0']['statistics'] == ['in', 'ln', 'bn']
    scalars = ratio_scalars(ratios)
    assert scalars['ratios/0/mean_in'] == pytest.approx(F.softmax(torch.tensor([2., 0, -1]),
                                                                  0)[0].item())
    assert scalars['ratios/0/var_bn'] == pytest.approx(1 / 3)
    p, q = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    expected = sum(a * torch.log(torch.tensor(a / b)) + b * torch.log(torch.tensor(b / a))
                   for a, b in zip(p, q))
    assert symmetric_kl(p, q) == pytest.approx(expected.item()) and symmetric_kl(p, p) == 0


def batches(seed, count, channels=8):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, channels, 5, 4, generator=generator) * (i + 1) + i
            for i in range(count)]


def test_batch_average_gives_the_exact_average_of_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), SwitchNorm2d(16),
                                SwitchWhiten2d(16, num_pergroup=8, sw_type=5))
    data = batches(0, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    used = batch_average_statistics(model, data, model, num_batches=4)
    assert used == 4 and model.training and model[1].momentum == 0.1
    sn_copy = copy.deepcopy(model[1]).train()  # SN in train mode, as during averaging
    with torch.no_grad():
        sn_input = [model[0](x) for x in data[:4]]
        sw_input = [sn_copy(f) for f in sn_input]
    means = torch.stack([f.mean((0, 2, 3)) for f in sn_input])
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in sn_input])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, variances.mean(0))
    groups = [f.reshape(3, 2, 8, -1).permute(1, 2, 0, 3).reshape(2, 8, -1) for f in sw_input]
    sw_means = torch.stack([g.mean(-1, keepdim=True) for g in groups])
    sw_covs = torch.stack([torch.stack([torch.cov(group) for group in g]) for g in groups])
    torch.testing.assert_close(model[2].running_mean, sw_means.mean(0))
    torch.testing.assert_close(model[2].running_cov, sw_covs.mean(0), rtol=1e-4, atol=1e-5)
    for key, value in before.items():  # weights and ratios untouched
        if not key.split('.')[-1].startswith(('running', 'num_batches')):
            assert torch.equal(model.state_dict()[key], value), key


def _average_on_ranks(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    layer = SwitchNorm2d(8)
    batch_average_statistics(layer, batches(rank, 3), layer)
    torch.save((layer.running_mean, layer.running_var), f'{out}.{rank}')
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_batch_average_is_reduced_over_processes(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    spawn_ranks(_average_on_ranks, (2, port, str(tmp_path / 'stats')), nprocs=2, timeout=150)
    local = []
    for rank in range(2):
        layer = SwitchNorm2d(8)
        batch_average_statistics(layer, batches(rank, 3), layer)
        local.append((layer.running_mean, layer.running_var))
    for rank in range(2):
        mean, var = torch.load(tmp_path / f'stats.{rank}', weights_only=True)
        torch.testing.assert_close(mean, (local[0][0] + local[1][0]) / 2)
        torch.testing.assert_close(var, (local[0][1] + local[1][1]) / 2)


def test_hard_ratios_are_one_hot_and_get_no_gradient():
    torch.manual_seed(0)
    layer = SwitchNorm2d(4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.1, 0.9, 0.3]))
        layer.var_weight.copy_(torch.tensor([1.0, -1.0, 2.0]))
    hard = harden_state_dict(layer.state_dict())
    layer.load_state_dict(hard)
    mean, var = layer.ratios()
    assert mean.tolist() == [0.0, 1.0, 0.0] and var.tolist() == [0.0, 0.0, 1.0]
    layer(torch.randn(2, 4, 3, 3)).square().sum().backward()
    assert torch.equal(layer.mean_weight.grad, torch.zeros(3))
    assert torch.equal(layer.var_weight.grad, torch.zeros(3))


def every_kind_of_layer():
    """SN, SSN with unfixed sparse ratios, SSN with fixed (one-hot probability) ratios, SW,
    SW with tied ratios, SN without BN: each with a known argmax."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(SwitchNorm2d(8), SparseSwitchNorm2d(8), SparseSwitchNorm2d(8),
                                SwitchWhiten2d(8, num_pergroup=4, sw_type=5),
                                SwitchWhiten2d(8, num_pergroup=4, tie_weight=True),
                                SwitchNorm2d(8, using_bn=False))
    with torch.no_grad():
        model[0].mean_weight.copy_(torch.tensor([0.1, 0.9, 0.3]))
        model[1].radius.fill_(0.3)
        model[1].mean_weight.copy_(torch.tensor([0.1, 2.0, 0.3]))
        model[1].var_weight.copy_(torch.tensor([3.0, 2.0, 0.3]))
        model[2].radius.fill_(1.0)
        model[2].mean_weight.copy_(torch.tensor([0.1, 0.2, 2.0]))
        model[3].sw_var_weight.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0]))
        model[4].sw_mean_weight.copy_(torch.tensor([-1.0, 1.0]))
        model[5].var_weight.copy_(torch.tensor([0.0, 1.0]))
    assert model[2].fix_one_hot() == (True, True)  # stores one-hot PROBABILITIES
    expected = {'0': ('ln', 'in'), '1': ('ln', 'in'), '2': ('bn', 'in'), '3': ('bw', 'in'),
                '4': ('iw', 'iw'), '5': ('in', 'ln')}
    return model, expected


def test_harden_every_layer_kind_model_and_state_dict_alike():
    model, expected = every_kind_of_layer()
    hard_state = harden_state_dict(model.state_dict())
    assert harden_ratios(model) == expected
    for key, value in model.state_dict().items():
        assert torch.equal(hard_state[key], value), key
    assert model[1].mean_fixed.item() == 1 and model[1].var_fixed.item() == 1
    model.train()
    x = torch.randn(2, 8, 3, 3)
    assert torch.isfinite(model(x)).all()
    for layer in model:
        mean, var = layer.ratios()
        assert sorted(mean.tolist())[-1] == 1.0 and sorted(var.tolist())[-1] == 1.0
    # Hardening again changes nothing (fixed SSN ratios keep their probabilities).
    again = copy.deepcopy(model)
    assert harden_ratios(again) == expected
    for key, value in again.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_harden_refuses_ratios_that_are_not_finite():
    model, _ = every_kind_of_layer()
    with torch.no_grad():
        model[1].mean_weight[0] = float('nan')
    with pytest.raises(ValueError, match=r'^1: expected finite ratio parameters'):
        harden_ratios(copy.deepcopy(model))
    with pytest.raises(ValueError, match=r'^1: expected finite ratio parameters'):
        harden_state_dict(model.state_dict())


def resnet18_sn(norm='SN'):
    pytest.importorskip('mmdet')
    from mmengine.registry import MODELS, init_default_scope
    import mmsn  # noqa: F401
    init_default_scope('mmdet')
    return MODELS.build(dict(type='ResNet', depth=18, base_channels=16,
                             norm_cfg=dict(type=norm), init_cfg=None))


@pytest.mark.parametrize('norm', ['SN', 'SyncSN'])
def test_deployed_model_equals_the_hard_ratio_model(norm):
    torch.manual_seed(0)
    model = resnet18_sn(norm)
    layers = [m for m in model.modules() if isinstance(m, SwitchNorm2d)
              or isinstance(m, SyncSwitchNorm)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_(0, 0.2)
            layer.running_mean.normal_(0, 0.2)
            layer.running_var.uniform_(0.5, 2.0)
            layer.mean_weight.normal_()
            layer.var_weight.normal_()
            if i % 3 == 0:  # a third of the layers pick BN for both
                layer.mean_weight[2] = layer.var_weight[2] = 10.0
    choices = harden_ratios(model)
    assert sum(c == ('bn', 'bn') for c in choices.values()) >= len(layers) // 3
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match='eval mode'):
        deploy_hard_switchable(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), SwitchNorm2d(4)))
    done = deploy_hard_switchable(model)
    assert len(done) == len(layers)
    remaining = [m for m in model.modules() if isinstance(m, (SwitchNorm2d, SyncSwitchNorm))]
    assert not remaining
    folded = [k for k, v in done.items() if v.startswith('folded')]
    assert folded and isinstance(model.get_submodule(folded[0]), torch.nn.Identity)
    assert any(isinstance(m, HardSwitchNorm) for m in model.modules())
    with torch.no_grad():
        got = model(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def deployed_outputs(model, x):
    """``(done, output after, output before)`` of deploying an eval ``model`` on ``x``."""
    with torch.no_grad():
        expected = model(x)
        done = deploy_hard_switchable(model)
        return done, model(x), expected


def hard_bn_sn(channels):
    layer = SwitchNorm2d(channels)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([-9.0, -9.0, 9.0]))
        layer.var_weight.copy_(torch.tensor([-9.0, -9.0, 9.0]))
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer


def test_channel_affine_without_a_preceding_conv():
    model = torch.nn.Sequential(torch.nn.ReLU(), hard_bn_sn(4))
    harden_ratios(model)
    model.eval()
    x = torch.randn(2, 4, 3, 3)
    expected = model(x)
    deploy_hard_switchable(model)
    assert isinstance(model[1], ChannelAffine)
    torch.testing.assert_close(model(x), expected)


def random_sw_statistics(layer, choice=None):
    """Random affine and running moments (SPD covariance); ratios one-hot on ``choice``
    (mean statistic, covariance statistic) when given."""
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_(0, 0.2)
        layer.running_mean.normal_(0, 0.3)
        a = torch.randn(layer.running_cov.shape) * 0.3
        layer.running_cov.copy_(a @ a.transpose(1, 2) + 0.5 * torch.eye(layer.num_pergroup))
        for logits, statistic in zip((layer.sw_mean_weight, layer.sw_var_weight),
                                     choice or (None, None)):
            logits.normal_()
            if statistic is not None:
                logits[layer.statistics.index(statistic)] = 20.0


@pytest.mark.parametrize('sw_type', [2, 5])
def test_deployed_sw_resnet_equals_the_hard_ratio_model(sw_type):
    """SW layers whose hard ratios pick the batch statistics (BW, or BN for sw_type 5) fold
    into the preceding conv; one that picks IW stays."""
    pytest.importorskip('mmdet')
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='SWResNet', depth=18, base_channels=16, norm_cfg=dict(type='BN'), init_cfg=None,
        sw_cfg=dict(type='SW', sw_type=sw_type, num_pergroup=8),
        sw_layers=['norm1', 'layer1.0.norm2', 'layer1.1.norm1', 'layer2.0.norm2']))
    batch = ('bw', 'bn') if sw_type == 5 else ('bw', 'bw')
    choices = [('bw', 'bw'), batch, ('iw', 'bw'), ('bw', 'bw')]
    layers = [m for m in model.modules() if isinstance(m, SwitchWhiten2d)]
    for layer, choice in zip(layers, choices):
        random_sw_statistics(layer, choice)
    assert list(harden_ratios(model).values()) == choices
    model.eval()
    done, got, expected = deployed_outputs(model, torch.randn(2, 3, 32, 32))
    assert done == {name: 'folded into the preceding conv' for name in
                    ('sw1', 'layer1.0.sw2', 'layer2.0.sw2')}
    assert isinstance(model.layer1[1].sw1, SwitchWhiten2d)  # per-sample: left
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sw_without_a_preceding_conv_becomes_a_grouped_conv():
    layer = SwitchWhiten2d(16, num_pergroup=8, sw_type=2, T=3)
    random_sw_statistics(layer, ('bw', 'bw'))
    model = torch.nn.Sequential(torch.nn.ReLU(), layer)
    harden_ratios(model)
    model.eval()
    x = torch.randn(2, 16, 3, 3)
    expected = model(x)
    assert deploy_hard_switchable(model) == {'1': 'grouped 1x1 conv'}
    assert isinstance(model[1], torch.nn.Conv2d) and model[1].groups == 2
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_layers_after_weight_standardized_convs_are_not_folded():
    """ConvWS2d standardizes its weight in forward, so a folded scale would be undone: such
    convs keep their weight and the layer becomes a separate map; mmcv's plain Conv2d
    wrapper folds."""
    cnn = pytest.importorskip('mmcv.cnn')
    from mmcv.cnn.bricks import wrappers
    torch.manual_seed(0)
    sw = SwitchWhiten2d(8, num_pergroup=4, sw_type=2, T=3)
    random_sw_statistics(sw, ('bw', 'bw'))
    model = torch.nn.Sequential(cnn.ConvWS2d(3, 8, 3, padding=1), hard_bn_sn(8),
                                cnn.ConvWS2d(8, 8, 1), sw,
                                wrappers.Conv2d(8, 8, 1), hard_bn_sn(8))
    harden_ratios(model)
    model.eval()
    weights = [model[i].weight.clone() for i in (0, 2)]
    done, got, expected = deployed_outputs(model, torch.randn(2, 3, 5, 5))
    assert done == {'1': 'per-channel affine', '3': 'grouped 1x1 conv',
                    '5': 'folded into the preceding conv'}
    for i, weight in zip((0, 2), weights):
        torch.testing.assert_close(model[i].weight, weight, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_deployment_in_bfloat16():
    """bf16 parameters with float32 buffers (how checkpoints are cast for inference) fold
    too: the maps are computed in float32/float64 and rounded once to bf16."""
    torch.manual_seed(0)
    sw = SwitchWhiten2d(8, num_pergroup=4, sw_type=2, T=3)
    random_sw_statistics(sw, ('bw', 'bw'))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), hard_bn_sn(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1), sw,
                                torch.nn.ReLU(), copy.deepcopy(sw))
    harden_ratios(model)
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same bf16 values, computed in float32
    x = torch.randn(2, 3, 5, 5).to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(x.float())
        undeployed_error = (model(x).float() - expected).abs().max()
        assert deploy_hard_switchable(reference)  # in float32 the deployment is exact
        torch.testing.assert_close(reference(x.float()), expected, rtol=1e-5, atol=1e-5)
        done = deploy_hard_switchable(model)
        got = model(x)
    assert list(done.values()) == ['folded into the preceding conv'] * 2 + ['grouped 1x1 conv']
    assert got.dtype == torch.bfloat16 and model[6].weight.dtype == torch.bfloat16
    for deployed, exact in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(deployed, exact.to(torch.bfloat16), rtol=0, atol=0)
    # the deployed bf16 model is no further off than the bf16 layers it replaces
    assert (got.float() - expected).abs().max() <= 2 * undeployed_error


def test_no_fold_into_weight_norm_convs_or_a_norm_that_runs_first():
    """weight_norm rebuilds the weight in a pre-hook (a folded scale would be lost); a
    ConvModule with order ('norm', 'conv', 'act') applies its norm before its conv."""
    cnn = pytest.importorskip('mmcv.cnn')
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # the hook form is deprecated, still used
        hooked = torch.nn.utils.weight_norm(torch.nn.Conv2d(3, 8, 1))
    parametrized = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(8, 8, 1))
    norm_first = cnn.ConvModule(8, 8, 1, norm_cfg=dict(type='SN'), order=('norm', 'conv', 'act'))
    model = torch.nn.Sequential(hooked, hard_bn_sn(8), parametrized, hard_bn_sn(8), norm_first)
    with torch.no_grad():
        norm_first.norm.load_state_dict(hard_bn_sn(8).state_dict())
    harden_ratios(model)
    model.eval()
    done, got, expected = deployed_outputs(model, torch.randn(2, 3, 4, 4))
    assert set(done.values()) == {'per-channel affine'} and len(done) == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_deployment_checks_every_layer_before_rewriting_any():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), hard_bn_sn(4),
                                torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), hard_bn_sn(4)))
    model.eval()
    with torch.no_grad():
        model[2][1].mean_weight[0] = float('nan')
    with pytest.raises(ValueError, match=r'^2\.1: SwitchNorm2d: expected finite ratios'):
        deploy_hard_switchable(model)
    assert isinstance(model[1], SwitchNorm2d)  # the first layer is still there


def test_a_ratio_with_one_entry_near_one_is_not_one_hot():
    """Stored SSN probabilities that are not a distribution ([1, 0.7, 0]) are not a hard
    choice: deployment leaves the layer (its LN share would be dropped otherwise)."""
    layer = SparseSwitchNorm2d(4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([1.0, 0.7, 0.0]))
        layer.var_weight.copy_(torch.tensor([1.0, 0.0, 0.0]))
        layer.mean_fixed.fill_(1)
        layer.var_fixed.fill_(1)
    assert hard_choice(layer) is None
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), layer).eval()
    assert deploy_hard_switchable(model) == {}
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([1.0, 0.0, 0.0]))
    assert hard_choice(layer) == ('in', 'in')


def test_deployment_refuses_a_switchable_layer_in_training_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), hard_bn_sn(4))
    model.eval()
    model[1].train()  # an eval model with one layer put back in training mode
    with pytest.raises(ValueError, match=r"training mode: \['1'\]"):
        deploy_hard_switchable(model)


@pytest.mark.slow
def test_hooks_under_a_runner_and_the_plot_tool(tmp_path, short_demo_run):
    from mmengine.runner import Runner
    cfg = short_demo_run(max_iters=4, interval=4)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.log_processor = dict(by_epoch=False)
    cfg.custom_hooks = [dict(type='SwitchableRatioHook', interval=2),
                        dict(type='BatchAverageHook', num_batches=3)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model
    layers = [m for m in model.modules() if isinstance(m, SwitchNorm2d)]
    assert len(layers) == 25
    # validation ran after the batch average over 3 batches (cumulative counter restarted)
    assert all(int(m.num_batches_tracked) == 3 for m in layers)
    scalar_files = list((tmp_path / 'work').glob('*/vis_data/scalars.json'))
    records = [json.loads(line) for line in scalar_files[0].read_text().splitlines()]
    logged = [r for r in records if 'ratios/backbone.stem.1/mean_in' in r]
    assert [r['step'] for r in logged] == [2, 4]
    checkpoint = load_checkpoint_file(str(tmp_path / 'work' / 'iter_4.pth'))
    assert len(checkpoint['meta']['switchable_ratios']) == 25
    out = tmp_path / 'plots'
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools/analysis_tools/plot_ratios.py'),
                          str(tmp_path / 'work'), '--out-dir', str(out)], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert '25 layers from' in run.stdout
    from PIL import Image
    for name in ('ratios', 'divergence', 'ratio_curves'):
        with Image.open(out / f'{name}.png') as image:
            image.verify()
        assert (out / f'{name}.svg').read_text().lstrip().startswith('<?xml')
    hard = tmp_path / 'hard.pth'
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools/analysis_tools/harden_ratios.py'),
                          str(tmp_path / 'work' / 'iter_4.pth'), str(hard)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    state = load_checkpoint_file(str(hard))['state_dict']
    logits = state['backbone.stem.1.mean_weight']
    assert sorted(F.softmax(logits, 0).tolist()) == [0.0, 0.0, 1.0]


@pytest.mark.slow
def test_batch_average_tool_on_a_checkpoint(tmp_path):
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmsn.demo.shapes import make_shapes_dataset
    data_root = str(tmp_path / 'shapes')
    make_shapes_dataset(data_root, num_train=6, num_val=2)
    config = osp.join(ROOT, 'configs/demo/fcn_r18-sn_shapes.py')
    init_default_scope('mmseg')
    model = MODELS.build(Config.fromfile(config).model)
    torch.save(dict(state_dict=model.state_dict(), meta={}), tmp_path / 'in.pth')
    options = [f'{loader}.dataset.data_root={data_root}/' for loader in
               ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    options += ['train_dataloader.batch_size=2']
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools/analysis_tools/batch_average.py'),
                          config, str(tmp_path / 'in.pth'), str(tmp_path / 'out.pth'),
                          '--num-batches', '2', '--work-dir', str(tmp_path / 'work'),
                          '--cfg-options'] + options, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'over 2 batches' in run.stdout
    out = load_checkpoint_file(str(tmp_path / 'out.pth'))
    before = model.state_dict()
    changed = [k for k, v in out['state_dict'].items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
                           for k in changed)
    assert int(out['state_dict']['backbone.stem.1.num_batches_tracked']) == 2
