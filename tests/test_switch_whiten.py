"""SwitchWhiten2d: whitening, its standardization special cases, Newton against the paper."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mmsn import SwitchWhiten2d
from mmsn.ops import SW_STATISTICS


def one_hot_logits(sw_type, name, big=1e4):
    logits = torch.full((sw_type,), -big, dtype=torch.float64)
    logits[SW_STATISTICS[sw_type].index(name)] = 0
    return logits


def set_logits(layer, mean_logits, var_logits=None):
    with torch.no_grad():
        layer.sw_mean_weight.copy_(mean_logits)
        if layer.sw_var_weight is not None:
            layer.sw_var_weight.copy_(mean_logits if var_logits is None else var_logits)


def random_input(shape, dtype=torch.float64, offset=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Correlated channels, so whitening has something to remove.
    x = torch.randn(shape, generator=gen, dtype=dtype)
    mix = torch.eye(shape[1], dtype=dtype) + 0.3 * torch.randn(shape[1], shape[1], generator=gen,
                                                               dtype=dtype)
    return torch.einsum('dc,nchw->ndhw', mix, x) + offset


def randomized_layer(channels, **kwargs):
    layer = SwitchWhiten2d(channels, **kwargs).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.sw_mean_weight.uniform_(-1, 1)
        if layer.sw_var_weight is not None:
            layer.sw_var_weight.uniform_(-1, 1)
    return layer


def paper_switch_whiten(x, layer, bw_stats=None):
    """SW paper Eqn. (5)-(7) in float64, written per sample and group with explicit loops."""
    x = x.double()
    n, channels, h, w = x.shape
    c, groups = layer.num_pergroup, channels // layer.num_pergroup
    mean_ratio, var_ratio = (r.double() for r in layer.ratios())
    names = SW_STATISTICS[layer.sw_type]
    eye = torch.eye(c, dtype=torch.float64)
    out = torch.empty_like(x)
    for g in range(groups):
        xg = x[:, g * c:(g + 1) * c].permute(1, 0, 2, 3).reshape(c, n, h * w)
        if bw_stats is None:
            flat = xg.reshape(c, -1)
            mu_bw = flat.mean(1, keepdim=True)
            cov_bw = (flat - mu_bw) @ (flat - mu_bw).T / flat.shape[1]
        else:
            mu_bw, cov_bw = bw_stats[0][g], bw_stats[1][g]
        for i in range(n):
            xi = xg[:, i]
            mu_iw = xi.mean(1, keepdim=True)
            cov_iw = (xi - mu_iw) @ (xi - mu_iw).T / xi.shape[1]
            sample = x[i].reshape(-1)
            mu_ln = sample.mean()
            var_ln = ((sample - mu_ln) ** 2).mean()
            means = {'bw': mu_bw, 'iw': mu_iw, 'bn': mu_bw, 'in': mu_iw, 'ln': mu_ln * torch.ones(c, 1, dtype=torch.float64)}
            covs = {'bw': cov_bw, 'iw': cov_iw, 'bn': torch.diag(torch.diag(cov_bw)),
                    'in': torch.diag(torch.diag(cov_iw)), 'ln': var_ln * eye}
            mu = sum(mean_ratio[k] * means[name] for k, name in enumerate(names))
            sigma = sum(var_ratio[k] * covs[name] for k, name in enumerate(names)) + layer.eps * eye
            trace = torch.trace(sigma)
            sigma_n = sigma / trace
            p = eye
            for _ in range(layer.T):
                p = 0.5 * (3 * p - torch.linalg.matrix_power(p, 3) @ sigma_n)
            whitened = p / torch.sqrt(trace) @ (xi - mu)
            out[i, g * c:(g + 1) * c] = whitened.reshape(c, h, w)
    return out * layer.weight.double().view(1, -1, 1, 1) + layer.bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize('num_pergroup', [4, 6])
def test_batch_whitening_gives_identity_batch_covariance(num_pergroup):
    x = random_input((4, 12, 5, 5))
    layer = SwitchWhiten2d(12, num_pergroup=num_pergroup, method='eigh', eps=1e-12).double()
    set_logits(layer, one_hot_logits(2, 'bw'))
    y = layer(x)
    groups = y.reshape(4, 12 // num_pergroup, num_pergroup, 25).permute(1, 2, 0, 3)
    groups = groups.reshape(12 // num_pergroup, num_pergroup, -1)
    centred = groups - groups.mean(-1, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / centred.shape[-1]
    torch.testing.assert_close(cov, torch.eye(num_pergroup, dtype=cov.dtype).expand_as(cov),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize('name,reference', [
    ('bn', lambda x, eps: F.batch_norm(x, None, None, training=True, eps=eps)),
    ('in', lambda x, eps: F.instance_norm(x, eps=eps)),
    ('ln', lambda x, eps: F.layer_norm(x, x.shape[1:], eps=eps)),
])
@pytest.mark.parametrize('method', ['eigh', 'newton'])
def test_sw_type_5_standardization_reduces_to_bn_in_ln(name, reference, method):
    x = random_input((3, 8, 4, 4))
    # Newton's iteration on a diagonal matrix converges per eigenvalue; the trace
    # normalisation keeps them in (0, 1], so T=30 is exact to float64 for this input.
    layer = SwitchWhiten2d(8, num_pergroup=4, sw_type=5, method=method, T=30).double()
    set_logits(layer, one_hot_logits(5, name))
    torch.testing.assert_close(layer(x), reference(x, layer.eps), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('sw_type', [2, 3, 5])
@pytest.mark.parametrize('tie_weight', [False, True])
def test_newton_path_matches_paper_equations(sw_type, tie_weight):
    x = random_input((3, 8, 4, 5))
    layer = randomized_layer(8, num_pergroup=4, sw_type=sw_type, tie_weight=tie_weight)
    torch.testing.assert_close(layer(x), paper_switch_whiten(x, layer), rtol=1e-9, atol=1e-9)
    layer.eval()  # eval: BW from the buffers (a mean (G, c, 1) and an unbiased covariance)
    bw = (layer.running_mean, layer.running_cov)
    torch.testing.assert_close(layer(x), paper_switch_whiten(x, layer, bw), rtol=1e-9, atol=1e-9)


def test_running_statistics_follow_pytorch_momentum():
    x = random_input((4, 8, 3, 3))
    layer = SwitchWhiten2d(8, num_pergroup=4, momentum=0.25).double()
    layer(x)
    flat = x.reshape(4, 2, 4, 9).permute(1, 2, 0, 3).reshape(2, 4, -1)
    mean = flat.mean(-1, keepdim=True)
    cov = (flat - mean) @ (flat - mean).transpose(1, 2) / (flat.shape[-1] - 1)
    torch.testing.assert_close(layer.running_mean, 0.25 * mean)
    torch.testing.assert_close(layer.running_cov, 0.75 * torch.eye(4, dtype=cov.dtype) + 0.25 * cov)


@pytest.mark.parametrize('sw_type', [2, 5])
@pytest.mark.parametrize('training', [True, False])
def test_gradcheck_float64(sw_type, training):
    layer = randomized_layer(4, num_pergroup=2, sw_type=sw_type, T=3)
    layer.train(training)
    x = random_input((2, 4, 3, 2)).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p for _, p in layer.named_parameters())
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def run(x, *params):
        state = dict(zip(names, params))
        state.update({k: v.clone() for k, v in buffers.items()})
        return torch.func.functional_call(layer, state, (x,))

    assert torch.autograd.gradcheck(run, (x,) + params, eps=1e-6, atol=1e-5)


def test_no_nan_for_constant_input_single_pixel_and_batch_of_one():
    for shape in [(1, 8, 1, 1), (1, 8, 4, 4), (3, 8, 1, 1)]:
        layer = SwitchWhiten2d(8, num_pergroup=4, sw_type=5)
        x = torch.full(shape, 2.0, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(layer.sw_var_weight.grad).all()
        layer.eval()
        assert torch.isfinite(layer(x)).all()


def test_empty_spatial_map_leaves_buffers_and_gives_zero_gradients():
    """A map with no positions (H = 0, N > 0): zero moments, not NaN (``mean`` over an empty
    dim), so the running statistics stay as they are and every gradient is zero."""
    layer = SwitchWhiten2d(8, num_pergroup=4, sw_type=5)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 8, 0, 3, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, param in layer.named_parameters():
        assert torch.equal(param.grad, torch.zeros_like(param)), name


@pytest.mark.parametrize('dtype,atol', [(torch.float16, 3e-2), (torch.bfloat16, 1e-1)])
def test_low_precision_input_uses_float32_statistics(dtype, atol):
    x = random_input((4, 8, 5, 5), dtype=torch.float32)
    layer = randomized_layer(8, num_pergroup=4, sw_type=5).float()
    expected = copy.deepcopy(layer)(x.to(dtype).float())
    y = layer(x.to(dtype))
    assert y.dtype == dtype and layer.running_cov.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=atol)


def test_channels_last_and_state_dict():
    x = random_input((2, 8, 4, 3), dtype=torch.float32)
    layer = randomized_layer(8, num_pergroup=4).float()
    expected = copy.deepcopy(layer)(x)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)
    assert layer.running_mean.shape == (2, 4, 1) and layer.running_cov.shape == (2, 4, 4)
    clone = SwitchWhiten2d(8, num_pergroup=4)
    clone.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
    assert set(SwitchWhiten2d(8, 4, tie_weight=True).state_dict()) == {
        'weight', 'bias', 'sw_mean_weight', 'running_mean', 'running_cov', 'num_batches_tracked'}
    assert 'sw_type=2' in repr(layer) and SwitchWhiten2d._abbr_ == 'sw'


@pytest.mark.parametrize('make,match', [
    (lambda: SwitchWhiten2d(10, num_pergroup=4), r'num_pergroup: expected a divisor of num_features=10, got 4'),
    (lambda: SwitchWhiten2d(8, num_pergroup=4, sw_type=4), r'sw_type: expected one of \[2, 3, 5\], got 4'),
    (lambda: SwitchWhiten2d(8, num_pergroup=4, method='svd'), r"method: expected 'newton' or 'eigh'"),
    (lambda: SwitchWhiten2d(8, num_pergroup=4, T=0), r'T: expected a positive int'),
    (lambda: SwitchWhiten2d(8, num_pergroup=4)(torch.randn(2, 8, 3)), r'expected a 4-D'),
    (lambda: SwitchWhiten2d(8, num_pergroup=4)(torch.randn(2, 4, 3, 3)), r'expected 8 channels'),
])
def test_bad_input_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_options_that_size_the_buffers_are_fixed():
    layer = SwitchWhiten2d(32, num_pergroup=16, sw_type=3, T=5)
    with pytest.raises(AttributeError, match='num_pergroup: fixed when the layer is built'):
        layer.num_pergroup = 8
    with pytest.raises(AttributeError, match='sw_type: fixed'):
        layer.sw_type = 5
    layer.T = 3
    assert layer.config.T == 3 and layer.config.sw_type == 3 and 'T=3' in repr(layer)
    with pytest.raises(ValueError, match='T: expected a positive int, got 0'):
        layer.T = 0
