"""SwitchNorm1d/2d/3d: the paper's equations, its special cases and the layer's contract."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmsn import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d

INSTANCE, LAYER, BATCH = 0, 1, 2


def one_hot_logits(index, size=3, big=1e4):
    logits = torch.full((size,), -big, dtype=torch.float64)
    logits[index] = 0
    return logits


def set_ratio_logits(layer, mean_logits, var_logits):
    with torch.no_grad():
        layer.mean_weight.copy_(mean_logits)
        layer.var_weight.copy_(var_logits)


def paper_switch_norm(x, mean_ratio, var_ratio, weight, bias, eps, bn_stats=None):
    """SN paper Eqn. (2)-(3) evaluated directly over the pixel sets I_in, I_ln, I_bn."""
    x = x.double()
    if x.dim() == 2:  # (N, C): one element per instance
        return paper_switch_norm(x[..., None], mean_ratio, var_ratio, weight, bias, eps,
                                 bn_stats and tuple(s[..., None] for s in bn_stats))[..., 0]
    spatial = tuple(range(2, x.dim()))

    def moments(dims):
        mu = x.mean(dims, keepdim=True)
        return mu, ((x - mu) ** 2).mean(dims, keepdim=True)

    stats = [moments(spatial), moments((1,) + spatial)]
    if len(mean_ratio) == 3:
        stats.append(moments((0,) + spatial) if bn_stats is None else bn_stats)
    mu = sum(w * s[0] for w, s in zip(mean_ratio.double(), stats))
    var = sum(w * s[1] for w, s in zip(var_ratio.double(), stats))
    view = (1, -1) + (1,) * len(spatial)
    return weight.double().view(view) * (x - mu) / torch.sqrt(var + eps) + bias.double().view(view)


SHAPES = {
    SwitchNorm1d: [(4, 6), (4, 6, 7)],
    SwitchNorm2d: [(3, 5, 4, 6), (1, 5, 1, 1), (2, 5, 7, 7)],
    SwitchNorm3d: [(2, 4, 3, 4, 5)],
}
CASES = [(cls, shape) for cls, shapes in SHAPES.items() for shape in shapes]


def random_input(shape, dtype=torch.float64, offset=5.0):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    return (torch.randn(shape, generator=gen, dtype=dtype) * 2 + offset)


def randomized_layer(cls, channels, **kwargs):
    layer = cls(channels, **kwargs).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.mean_weight.uniform_(-1, 1)
        layer.var_weight.uniform_(-1, 1)
    return layer


# torch's own IN/BN refuse one value per channel; the no-NaN test covers that case for SN.
@pytest.mark.parametrize('cls,shape', [c for c in CASES if len(c[1]) > 2 and c[1][0] * c[1][-1] > 1])
def test_one_hot_ratios_reduce_to_instance_layer_batch_norm(cls, shape):
    x = random_input(shape)
    layer = cls(shape[1]).double()
    set_ratio_logits(layer, one_hot_logits(INSTANCE), one_hot_logits(INSTANCE))
    torch.testing.assert_close(layer(x), F.instance_norm(x, eps=layer.eps))
    set_ratio_logits(layer, one_hot_logits(LAYER), one_hot_logits(LAYER))
    torch.testing.assert_close(layer(x), F.layer_norm(x, x.shape[1:], eps=layer.eps))
    set_ratio_logits(layer, one_hot_logits(BATCH), one_hot_logits(BATCH))
    layer.reset_running_stats()
    bn_mean, bn_var = torch.zeros(shape[1], dtype=x.dtype), torch.ones(shape[1], dtype=x.dtype)
    for _ in range(3):  # training: batch statistics, running buffers as F.batch_norm's
        xi = random_input(shape) * torch.rand(1, dtype=x.dtype)
        expected = F.batch_norm(xi, bn_mean, bn_var, training=True, momentum=0.1, eps=layer.eps)
        torch.testing.assert_close(layer(xi), expected)
        torch.testing.assert_close(layer.running_mean, bn_mean)
        torch.testing.assert_close(layer.running_var, bn_var)
    assert layer.num_batches_tracked.item() == 3
    layer.eval()  # eval: BN branch from the running buffers
    torch.testing.assert_close(layer(x), F.batch_norm(x, layer.running_mean, layer.running_var,
                                                      training=False, eps=layer.eps))


@pytest.mark.parametrize('cls,shape', CASES)
@pytest.mark.parametrize('using_bn', [True, False])
def test_mixed_ratios_match_paper_equations(cls, shape, using_bn):
    x = random_input(shape)
    layer = randomized_layer(cls, shape[1], using_bn=using_bn)
    mean_ratio, var_ratio = layer.ratios()
    expected = paper_switch_norm(x, mean_ratio, var_ratio, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    if using_bn:  # eval: the BN branch from the buffers, IN and LN still from the input
        layer.eval()
        view = (1, -1) + (1,) * (x.dim() - 2)
        bn_stats = (layer.running_mean.view(view), layer.running_var.view(view))
        expected = paper_switch_norm(x, mean_ratio, var_ratio, layer.weight, layer.bias,
                                     layer.eps, bn_stats)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('cls,shape', [(SwitchNorm1d, (3, 4, 5)), (SwitchNorm2d, (3, 4, 3, 2)),
                                       (SwitchNorm2d, (1, 3, 1, 1)), (SwitchNorm3d, (2, 3, 2, 2, 3))])
@pytest.mark.parametrize('training', [True, False])
def test_gradcheck_float64(cls, shape, training):
    layer = randomized_layer(cls, shape[1])
    layer.train(training)
    x = random_input(shape).requires_grad_()
    params = (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def run(x, *params):
        state = dict(zip(('weight', 'bias', 'mean_weight', 'var_weight'), params))
        state.update({k: v.clone() for k, v in buffers.items()})
        return torch.func.functional_call(layer, state, (x,))

    assert torch.autograd.gradcheck(run, (x,) + params, eps=1e-6, atol=1e-6)


def test_constant_input_single_pixel_and_batch_of_one_give_no_nan():
    for shape in [(1, 4, 1, 1), (1, 4, 5, 5), (3, 4, 1, 1)]:
        layer = SwitchNorm2d(4)
        x = torch.full(shape, 3.0, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(layer.mean_weight.grad).all()
        assert torch.isfinite(layer.running_var).all()
        layer.eval()
        assert torch.isfinite(layer(x)).all()


def test_large_mean_keeps_precision_in_float32():
    # E[x^2] - E[x]^2 in float32 would lose everything at this offset; centred terms do not.
    x64 = random_input((4, 3, 8, 8), offset=1e4)
    layer64 = randomized_layer(SwitchNorm2d, 3)
    layer32 = copy.deepcopy(layer64).float()
    torch.testing.assert_close(layer32(x64.float()).double(), layer64(x64), rtol=0, atol=2e-3)


@pytest.mark.parametrize('dtype,atol', [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_low_precision_input_uses_float32_statistics(dtype, atol):
    x = random_input((4, 6, 5, 5), dtype=torch.float32, offset=20)
    layer = randomized_layer(SwitchNorm2d, 6).float()
    low = copy.deepcopy(layer)
    expected = layer(x.to(dtype).float())
    y = low(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=atol)
    assert low.running_mean.dtype == torch.float32
    torch.testing.assert_close(low.running_var, layer.running_var)


def test_channels_last_input_gives_channels_last_output():
    x = random_input((2, 6, 5, 4), dtype=torch.float32)
    layer = randomized_layer(SwitchNorm2d, 6).float()
    expected = copy.deepcopy(layer)(x)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)


def test_momentum_none_is_cumulative_average():
    layer = SwitchNorm2d(3, momentum=None)
    batches = [random_input((2, 3, 4, 4), dtype=torch.float32, offset=i) for i in range(4)]
    for x in batches:
        layer(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches])
    torch.testing.assert_close(layer.running_mean, means.mean(0))
    torch.testing.assert_close(layer.running_var, variances.mean(0))


def test_last_gamma_using_bn_and_names():
    layer = SwitchNorm2d(8, last_gamma=True, using_bn=False)
    assert torch.equal(layer.weight, torch.zeros(8))
    assert layer.mean_weight.shape == (2,) and layer.running_mean is None
    assert set(layer.state_dict()) == {'weight', 'bias', 'mean_weight', 'var_weight',
                                       'num_batches_tracked'}
    full = SwitchNorm2d(8)
    assert set(full.state_dict()) == {'weight', 'bias', 'mean_weight', 'var_weight',
                                      'running_mean', 'running_var', 'num_batches_tracked'}
    torch.testing.assert_close(full.ratios()[0], torch.full((3,), 1 / 3))
    assert 'using_bn=True' in repr(full) and SwitchNorm2d._abbr_ == 'sn'


def test_state_dict_round_trip_is_exact():
    layer = randomized_layer(SwitchNorm2d, 5)
    layer(random_input((3, 5, 4, 4)))
    clone = SwitchNorm2d(5).double()
    clone.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
    legacy = {k: v for k, v in layer.state_dict().items() if k != 'num_batches_tracked'}
    SwitchNorm2d(5).double().load_state_dict(legacy)  # authors' checkpoints have no counter


@pytest.mark.parametrize('make,match', [
    (lambda: SwitchNorm2d(4)(torch.randn(2, 4, 3)), r'input: expected a 4-D .* got a 3-D'),
    (lambda: SwitchNorm1d(4)(torch.randn(2, 4, 3, 3)), r'input: expected a 2-D or 3-D'),
    (lambda: SwitchNorm3d(4)(torch.randn(2, 4, 3, 3)), r'expected a 5-D'),
    (lambda: SwitchNorm2d(4)(torch.randn(2, 5, 3, 3)), r'expected 4 channels .* got 5'),
    (lambda: SwitchNorm2d(4)(torch.ones(2, 4, 3, 3, dtype=torch.long)), r'floating-point'),
    (lambda: SwitchNorm2d(0), r'num_features: expected a positive int, got 0'),
    (lambda: SwitchNorm2d(4, momentum=1.5), r'momentum: expected a float in \[0, 1\]'),
    (lambda: SwitchNorm2d(4, eps=-1), r'eps: expected a positive float'),
])
def test_bad_input_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layer_options_live_in_one_frozen_config():
    """The op config is built with the layer and kept across calls and modes; setting an
    option replaces it with a checked copy, which the next call reads."""
    layer = SwitchNorm2d(3)
    config = layer.config
    x = random_input((2, 3, 4, 4), dtype=torch.float32)
    layer(x)
    layer.eval()
    layer(x)
    assert layer.config is config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eps = 1.0
    layer.momentum = None  # (what tools/batch_average.py does: a cumulative average)
    assert layer.config is not config and layer.config.momentum is None
    assert layer.config.eps == config.eps and layer.momentum is None
    with pytest.raises(ValueError, match=r'momentum: expected a float in \[0, 1\]'):
        layer.momentum = 2.0
    assert layer.momentum is None
    layer.train()
    layer.reset_running_stats()
    layer(x)  # one batch averaged cumulatively: its own mean, not 0.1 of it
    torch.testing.assert_close(layer.running_mean, x.mean((0, 2, 3)))


def test_empty_batch_passes_through():
    layer = SwitchNorm2d(3)
    y = layer(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert layer.num_batches_tracked.item() == 0
