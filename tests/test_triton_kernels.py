"""SN and SW on the Triton kernels against the PyTorch reference, forward and backward (x,
weight, bias, both ratio logits, running statistics), per dtype, over odd shapes and layouts.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small. The tolerances are chosen to hold on a GPU too, so
that a GPU run of the same tests fails only for a real error. The interpreter computes in
numpy's IEEE arithmetic; on sm_80/sm_90 the kernels differ from it (and from PyTorch) by a
few units in the last place per operation: float32 ``a / b`` compiles to the approximate
div.full.f32 (about 2 ulp), ``tl.sqrt`` to sqrt.approx.f32, ``tl.exp`` (the softmax) to
ex2.approx.f32, FMA contraction is on, and tree reductions add in another order than
PyTorch's. Relative to the output's scale (its largest magnitude, at least 1):

* float64 1e-10: the same maths in double precision, where division and square root stay
  IEEE-rounded on the GPU; FMA and summation order move the last bits (1e-16 an operation,
  a few hundred operations deep through Newton's iteration and its backward).
* float32 1e-4: those differences are about 1e-7 an operation (measured: about 1e-6 at the
  end of Newton's iteration here); the margin covers sums of N*H*W terms in another order,
  the same reason as the float32 tolerance of parameter gradients and running buffers, which
  are float32 sums in both paths for every input dtype.
* float16 2e-3, bfloat16 1.6e-2: both paths compute in float32 and round once to the output
  dtype, so a float32 difference can move a value across a rounding boundary: one unit in the
  last place of float16 (2**-10 relative; two allowed) and two of bfloat16 (2**-7 each).
"""
import copy
import os

import pytest
import torch

from mmsn import (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchWhiten2d, SyncSwitchNorm,
                  SyncSwitchWhiten2d)
from mmsn.ops import backend_for, set_backend

pytest.importorskip('triton')

TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4),
              torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def random_layer(cls, channels, using_bn=True, dtype=torch.float32):
    torch.manual_seed(0)
    layer = cls(channels, using_bn=using_bn)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_(0, 0.5)
        layer.mean_weight.normal_()
        layer.var_weight.normal_()
        if using_bn:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
    return layer.to(torch.float64 if dtype == torch.float64 else torch.float32)


def run(layer, x, grad, backend, monkeypatch, train=True):
    set_backend(backend)
    layer.train(train)
    x = x.clone().requires_grad_()
    y = layer(x)
    (y.float() * grad).sum().backward()
    result = dict(y=y.detach(), x_grad=x.grad,
                  buffers={k: v.clone() for k, v in layer.named_buffers()},
                  grads={k: p.grad.clone() for k, p in layer.named_parameters()})
    set_backend(None)
    return result


def assert_match(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    # compared in float64 when either is: float32 cannot resolve float64's 1e-10
    wide = torch.float64 if torch.float64 in (got.dtype, want.dtype) else torch.float32
    torch.testing.assert_close(got.to(wide), want.to(wide), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f'{what}: {m}')


def compare(layer, x, dtype, monkeypatch, train=True):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    reference = run(copy.deepcopy(layer), x, grad, 'torch', monkeypatch, train)
    kernels = run(copy.deepcopy(layer), x, grad, 'triton', monkeypatch, train)
    assert kernels['y'].dtype == x.dtype and kernels['y'].shape == x.shape
    assert kernels['y'].stride() == reference['y'].stride()  # memory format kept
    assert_match(kernels['y'], reference['y'], dtype, 'y')
    assert_match(kernels['x_grad'], reference['x_grad'], dtype, 'dx')
    for key, value in reference['grads'].items():
        # parameter gradients are sums over N*H*W of float32 terms in both paths
        assert_match(kernels['grads'][key], value, max(dtype, torch.float32, key=_width), key)
    for key, value in reference['buffers'].items():
        if value.is_floating_point():
            assert_match(kernels['buffers'][key], value, max(dtype, torch.float32, key=_width),
                         key)
        else:
            assert torch.equal(kernels['buffers'][key], value), key


def _width(dtype):
    return {torch.float64: 3, torch.float32: 2}.get(dtype, 1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('shape', [(3, 5, 7, 7), (1, 6, 1, 1), (2, 3, 5, 9)],
                         ids=['7x7-C5', '1x1-N1', 'odd'])
def test_sn_kernels_match_reference(shape, dtype, monkeypatch):
    layer = random_layer(SwitchNorm2d, shape[1], dtype=dtype)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5).to(dtype)
    compare(layer, x, dtype, monkeypatch, train=True)
    compare(layer, x, dtype, monkeypatch, train=False)  # eval: IN/LN still per sample


def test_large_means_channels_last_and_no_bn_branch(monkeypatch):
    layer = random_layer(SwitchNorm2d, 4)
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(2)) + 1e3
    # Against float64: E[x^2] - E[x]^2 in float32 would be off by ~6% here; what remains is
    # the float32 rounding of x and of its mean (an ulp of 1e3 is 6e-5), scaled by gamma over
    # the standard deviation: 2.5e-4 measured (the reference's own: 1.9e-4), against which a
    # GPU's approximate division adds 1e-6. 1e-3 keeps a margin of 4x the error of either.
    truth = run(copy.deepcopy(layer).double(), x.double(), torch.ones(x.shape), 'torch',
                monkeypatch)['y']
    kernels = run(copy.deepcopy(layer), x, torch.ones(x.shape), 'triton', monkeypatch)['y']
    torch.testing.assert_close(kernels.double(), truth, rtol=1e-3, atol=1e-3)
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(2)) + 0.5
    compare(layer, x.to(memory_format=torch.channels_last), torch.float32, monkeypatch)
    compare(random_layer(SwitchNorm2d, 4, using_bn=False), x, torch.float32, monkeypatch)


@pytest.mark.parametrize('shape,layout,splits', [
    ((1, 2, 48, 48), 'nchw', 2), ((1, 80, 7, 9), 'channels_last', 2),
    ((2, 70, 1, 1), 'nchw', 1)], ids=['nchw-split-L', 'channels_last-2-channel-blocks',
                                       '1x1-wide-channel-tile'])
def test_sn_tiles_and_split_reductions(shape, layout, splits, monkeypatch):
    """Tiles that span several channels (masked past C), channels_last tiles, and
    reductions split over L and merged on the host."""
    from mmsn.ops.launching import as_ncl
    from mmsn.ops.triton_switch_norm import SNPlan
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 3 + 2
    if layout == 'channels_last':
        x = x.to(memory_format=torch.channels_last)
    assert SNPlan(as_ncl(x)).splits == splits  # (the CPU plan targets 4 programs)
    compare(random_layer(SwitchNorm2d, shape[1]), x, torch.float32, monkeypatch)


def test_gradient_in_another_layout_is_copied_once():
    from mmsn.ops.launching import as_ncl, in_layout_of
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    dy = torch.randn(2, 3, 4, 5)
    got = in_layout_of(dy, as_ncl(x))
    assert got.stride() == as_ncl(x).stride() and torch.equal(got, as_ncl(dy))
    assert in_layout_of(x, as_ncl(x)).data_ptr() == x.data_ptr()


@pytest.mark.parametrize('cls,shape', [(SwitchNorm1d, (4, 3)), (SwitchNorm1d, (2, 3, 10)),
                                       (SwitchNorm3d, (2, 3, 2, 3, 4)),
                                       (SyncSwitchNorm, (2, 3, 4, 4))])
def test_other_ranks_and_sync_fallback(cls, shape, monkeypatch):
    layer = random_layer(cls, shape[1])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    compare(layer, x, torch.float32, monkeypatch)


def test_empty_batch_and_constant_input(monkeypatch):
    layer = random_layer(SwitchNorm2d, 3)
    set_backend('triton')
    empty = torch.zeros(0, 3, 4, 4, requires_grad=True)
    y = layer(empty)
    y.sum().backward()
    assert y.shape == empty.shape and empty.grad.shape == empty.shape
    constant = torch.full((2, 3, 4, 4), 7.0, requires_grad=True)
    y = layer(constant)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(constant.grad).all()


def random_whitening(channels, dtype=torch.float32, cls=SwitchWhiten2d, num_pergroup=16,
                     **kwargs):
    torch.manual_seed(0)
    layer = cls(channels, num_pergroup=num_pergroup, **kwargs)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_(0, 0.5)
        for logits in (layer.sw_mean_weight, layer.sw_var_weight):
            if logits is not None:
                logits.normal_()
        layer.running_mean.normal_()
        a = torch.randn(layer.running_cov.shape) * 0.3
        layer.running_cov.copy_(a @ a.transpose(1, 2) + torch.eye(num_pergroup))
    return layer.to(torch.float64 if dtype == torch.float64 else torch.float32)


# every sw_type in float32 and sw_type 5 (every statistic) in each dtype in the quick tier
@pytest.mark.parametrize('sw_type,dtype', [
    pytest.param(sw_type, dtype, id=f'{sw_type}-{str(dtype)[6:]}',
                 marks=[pytest.mark.slow] if sw_type != 5 and dtype != torch.float32 else [])
    for sw_type in (2, 3, 5) for dtype in (torch.float32, torch.float64, torch.bfloat16)])
def test_sw_kernels_match_reference(sw_type, dtype, monkeypatch):
    layer = random_whitening(32, dtype, sw_type=sw_type)
    x = (torch.randn(3, 32, 5, 7, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    compare(layer, x, dtype, monkeypatch, train=True)
    compare(layer, x, dtype, monkeypatch, train=False)


@pytest.mark.parametrize('case', ['1x1-N1', 'channels_last', 'tie_weight', 'sync-fallback',
                                  pytest.param('group32', marks=pytest.mark.slow),
                                  pytest.param('group64', marks=pytest.mark.slow),
                                  'large-mean', 'split-L'])
def test_sw_kernels_odd_cases(case, monkeypatch):
    kwargs = dict(tie_weight=True) if case == 'tie_weight' else {}
    cls = SyncSwitchWhiten2d if case == 'sync-fallback' else SwitchWhiten2d
    layer = random_whitening(32, cls=cls, **kwargs)
    if case in ('group32', 'group64'):  # their tiles are 16-64 positions: 54 take several
        # (64 channels: 2 groups of 32, 1 of 64; two groups of 64 are the test below's)
        layer = random_whitening(64, num_pergroup=int(case[5:]))
    shape = {'1x1-N1': (1, 32, 1, 1), 'split-L': (1, 32, 12, 12)}.get(
        case, (2, layer.num_features, 6, 9) if case.startswith('group') else
        (2, layer.num_features, 4, 6))
    if case == 'split-L':  # 2 (sample, group) programs, 144 positions: 2 splits of 128
        from mmsn.ops.launching import split_reduction
        assert split_reduction(2, 144, 128, torch.device('cpu')) == (2, 128)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    if case == 'channels_last':
        x = x.to(memory_format=torch.channels_last)
    if case == 'large-mean':
        # the IW moments are taken about each instance's first column: no cancellation.
        # Against float64, the float32 rounding of x near 1e3 (6e-5) through the whitening
        # matrix remains: 1e-4 measured (the reference's own: 3e-4; E[x x^T] - mu mu^T in
        # float32 would lose every digit); GPU arithmetic adds 1e-6.
        x = x + 1e3
        ones = torch.ones(x.shape)
        truth = run(copy.deepcopy(layer).double(), x.double(), ones, 'torch', monkeypatch)['y']
        kernels = run(copy.deepcopy(layer), x, ones, 'triton', monkeypatch)['y']
        torch.testing.assert_close(kernels.double(), truth, rtol=2e-3, atol=2e-3)
        return
    compare(layer, x, torch.float32, monkeypatch, train=case != '1x1-N1')
    if case == 'group64':  # eval too: Newton through scratch memory, the running moments
        compare(layer, x, torch.float32, monkeypatch, train=False)


@pytest.mark.slow
def test_sw_kernels_at_64_per_group_type5_two_iterations(monkeypatch):
    """Newton through scratch memory (64 per group) against the reference, forward,
    backward and buffers, train and eval: sw_type 5 (every statistic), T = 2 (the backward's
    dynamic loop at another count), two groups, channels_last."""
    layer = random_whitening(128, torch.float32, num_pergroup=64, sw_type=5, T=2)
    x = torch.randn(2, 128, 3, 3, generator=torch.Generator().manual_seed(6)) + 0.5
    x = x.to(memory_format=torch.channels_last)
    compare(layer, x, torch.float32, monkeypatch, train=True)
    compare(layer, x, torch.float32, monkeypatch, train=False)


def test_sw_kernels_refuse_float64_at_64_per_group(monkeypatch):
    """Float64 at 64 channels per group is the reference's (the kernels would spill):
    forcing the kernels raises, naming it; at 32 per group float64 takes the kernels."""
    from mmsn.ops.triton_switch_whiten import sw_kernels_refuse
    assert sw_kernels_refuse(32, 'newton', torch.float64) is None
    assert sw_kernels_refuse(64, 'newton', torch.float32) is None
    layer = random_whitening(128, torch.float64, num_pergroup=64)
    set_backend('triton')
    with pytest.raises(ValueError, match=r"backend 'triton' \(MMSN_BACKEND or set_backend\) "
                       'forces the kernels: input: the kernels take float64 at 16 or 32 '
                       'channels per group, got float64 at 64'):
        layer(torch.randn(2, 128, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize('which', ['weight', 'bias'])
def test_sw_weight_and_bias_are_independent(which, monkeypatch):
    """The functional op with only one of the affine parameters (the layers have both or
    neither): the kernels must neither drop the bias nor read a shift that is not there."""
    from mmsn.ops import SWConfig, switch_whiten
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 3, 4, generator=g)
    param = torch.rand(32, generator=g) + 0.5 if which == 'weight' else torch.randn(32, generator=g)
    logits = torch.randn(2, generator=g)
    results = {}
    for backend in ('torch', 'triton'):
        set_backend(backend)
        xi, p = x.clone().requires_grad_(), param.clone().requires_grad_()
        y = switch_whiten(xi, logits, logits, weight=p if which == 'weight' else None,
                          bias=p if which == 'bias' else None, running_mean=None,
                          running_cov=None, num_batches_tracked=None,
                          config=SWConfig(num_pergroup=16, sw_type=2, T=5),
                          use_batch_stats=True)
        y.backward(torch.ones_like(y) + x)
        results[backend] = (y.detach(), xi.grad, p.grad)
    for got, want in zip(results['triton'], results['torch']):
        assert_match(got, want, torch.float32, which)


def test_backend_dispatch():
    from mmsn.ops import use_backend
    x = torch.zeros(1)
    set_backend(None)
    assert backend_for(x) == 'torch'  # CPU tensors: the reference
    set_backend('triton')
    assert backend_for(x) == 'triton'
    with use_backend('torch'):
        assert backend_for(x) == 'torch'
    assert backend_for(x) == 'triton'
    with pytest.raises(ValueError, match="backend: expected one of .* or unset, got 'cuda'"):
        set_backend('cuda')
    assert backend_for(x) == 'triton'  # a refused name changes nothing


@pytest.mark.slow
def test_mmsn_backend_is_read_once_at_import():
    """``MMSN_BACKEND`` decides at import (a bad value fails the import, naming it);
    changing the variable later changes nothing."""
    import subprocess
    import sys
    script = ('import os, torch, mmsn.ops as ops\n'
              "os.environ['MMSN_BACKEND'] = 'torch'\n"
              'print(ops.backend_for(torch.zeros(1)))')
    for value, expected in (('triton', 'triton'), ('', 'torch')):
        env = dict(os.environ, MMSN_BACKEND=value, TRITON_INTERPRET='1')
        run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.split()[-1] == expected, run.stderr[-2000:]
    env = dict(os.environ, MMSN_BACKEND='cuda')
    run = subprocess.run([sys.executable, '-c', 'import mmsn'], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "MMSN_BACKEND: expected one of ('torch', 'triton') or unset, got 'cuda'" in run.stderr


@pytest.mark.parametrize('capability,expected', [((7, 5), 'torch'), ((8, 0), 'triton'),
                                                 ((9, 0), 'triton')])
def test_gpus_below_the_tested_capability_warn_once_and_use_the_reference(
        monkeypatch, capability, expected):
    """A faked CUDA device: below compute capability 8.0 (what the kernels are compiled and
    checked for) the layers warn once per device and take the reference."""
    import types
    import warnings

    import mmsn.ops as ops
    set_backend(None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Faked GPU')
    ops.gpu_supported.cache_clear()
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device('cuda', 0))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert backend_for(fake) == expected
            assert backend_for(fake) == expected
        messages = [str(w.message) for w in caught if 'compute capability' in str(w.message)]
        if expected == 'torch':
            assert len(messages) == 1 and 'Faked GPU has compute capability 7.5' in messages[0]
        else:
            assert messages == []
    finally:
        ops.gpu_supported.cache_clear()


def test_autocast_policy(monkeypatch):
    """Under autocast the layers take the activation dtype the convolution produced (bf16
    here), compute statistics in float32 and return that dtype, on both backends."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), SwitchNorm2d(32),
                                SwitchWhiten2d(32, num_pergroup=16))
    x = torch.randn(2, 3, 6, 6)
    outputs = {}
    for backend in ('torch', 'triton'):
        set_backend(backend)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outputs[backend] = copy.deepcopy(model)(x)
        assert outputs[backend].dtype == torch.bfloat16
    assert_match(outputs['triton'], outputs['torch'], torch.bfloat16, 'autocast')


def _op_cases():
    """(op name, args) for every registered op on tiny NCHW and channels_last inputs."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 5, generator=g)
    cl = torch.randn(2, 32, 3, 2, generator=g).to(memory_format=torch.channels_last)
    coef = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    def sn_forward_args(t, train, affine=True):
        c = t.shape[1]
        params = (coef(c), coef(c)) if affine else (None, None)
        return (t, coef(3), coef(3)) + params + (coef(c), coef(c).abs() + 0.5,
                                                 torch.tensor(3), train, 0.1, 1e-5, True)

    def sn_backward_args(t):
        forward = sn_forward_args(t, True)
        saved = torch.ops.mmsn.sn_forward(*forward)[1:5]
        return (torch.randn_like(t), t) + saved + forward[1:4] + (True, 1e-5, True)

    x32 = torch.randn(2, 64, 3, 2, generator=g)
    x64 = torch.randn(1, 64, 2, 2, generator=g)
    x16 = torch.randn(1, 16, 2, 2, generator=g)

    def sw_forward_args(t, train, per_group, affine=True, sw_type=5):
        c, groups = t.shape[1], t.shape[1] // per_group
        params = (coef(c), coef(c)) if affine else (None, None)
        return (t, coef(sw_type), coef(sw_type)) + params + (
            coef(groups, per_group, 1), _spd(coef(groups, per_group, 2 * per_group)),
            torch.tensor(3), train, per_group, sw_type, 5, 0.1, 1e-5, True)

    def sw_backward_args(t, per_group, affine=True):
        forward = sw_forward_args(t, True, per_group, affine)
        saved = torch.ops.mmsn.sw_forward(*forward)[1:6]
        return (torch.randn_like(t), t) + saved + forward[1:5] + (True, per_group, 5, 5, 1e-5,
                                                                  True)

    return [
        ('sn_forward', sn_forward_args(x, True)), ('sn_forward', sn_forward_args(cl, False)),
        ('sn_forward', sn_forward_args(x, True, affine=False)),
        ('sn_backward', sn_backward_args(x)), ('sn_backward', sn_backward_args(cl)),
        ('sw_forward', sw_forward_args(cl, True, 16)), ('sw_forward', sw_forward_args(x32, False, 16)),
        ('sw_forward', sw_forward_args(cl, True, 32, affine=False)),
        ('sw_backward', sw_backward_args(cl, 16)),
        ('sw_backward', sw_backward_args(x16, 16, affine=False)),  # (empty d_weight, d_bias)
        ('sw_forward', sw_forward_args(x64, True, 64, affine=False)),
    ]


def _spd(a):
    return a @ a.transpose(-1, -2) / a.shape[-1] + 0.1 * torch.eye(a.shape[-2])


#: the slower opcheck cases (SW at 32 and 64 per group, eval): the full suite only
_SLOW_OP_CASES = (6, 7, 10)


@pytest.mark.parametrize('name,args', [
    pytest.param(name, args, id=f'{name}-{i}',
                 marks=[pytest.mark.slow] if i in _SLOW_OP_CASES else [])
    for i, (name, args) in enumerate(_op_cases())])
def test_registered_ops_pass_opcheck(name, args):
    """torch.library's own checks: schema, fake implementation (shapes, dtypes, strides),
    autograd registration, AOT dispatch with static and dynamic shapes."""
    differentiable = name in ('sn_forward', 'sw_forward')
    if differentiable:  # (the buffers and the counter take no gradient)
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and i < 5
                     and a.is_floating_point() else a for i, a in enumerate(args))
    torch.library.opcheck(getattr(torch.ops.mmsn, name), args)


@pytest.mark.parametrize('case', ['sn-fp32', 'sn-bf16-channels_last', 'sn-sync-fallback',
                                  'sw-type5', 'sw-type2-channels_last'])
def test_composed_ops_match_reference(case, monkeypatch):
    """The form torch.compile traces (registered ops with their own autograd formulas,
    the mixing step in between), run eagerly against the reference."""
    import mmsn.ops
    monkeypatch.setattr(mmsn.ops, '_compiling', lambda: True)
    dtype = torch.bfloat16 if 'bf16' in case else torch.float32
    if case.startswith('sn'):
        layer = random_layer(SyncSwitchNorm if 'sync' in case else SwitchNorm2d, 5,
                             dtype=dtype)
        x = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(7)) + 0.5
    else:
        layer = random_whitening(32, dtype, sw_type=int(case[7]))
        x = torch.randn(3, 32, 3, 5, generator=torch.Generator().manual_seed(7)) + 0.5
    x = x.to(dtype)
    if 'channels_last' in case:
        x = x.to(memory_format=torch.channels_last)
    compare(layer, x, dtype, monkeypatch, train=True)
    compare(layer, x, dtype, monkeypatch, train=False)


# ResNet-50's norm shapes at 224x224 (channels, height, width), for the GPU run
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
                   (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
                   (512, 7, 7), (2048, 7, 7)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA GPU (run through the device tool)')


@needs_cuda
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('chw', RESNET50_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_kernels_on_resnet50_shapes_on_the_gpu(chw, dtype, layout, monkeypatch):
    """The compiled kernels (not the interpreter) at real sizes, N = 8: SN, and SW (16
    channels per group, sw_type 2 and 5) where the layer would sit."""
    x = (torch.randn((8,) + chw, generator=torch.Generator().manual_seed(9)) + 0.5).to(dtype)
    x = x.cuda()
    if layout == 'channels_last':
        x = x.to(memory_format=torch.channels_last)
    compare(random_layer(SwitchNorm2d, chw[0], dtype=dtype).cuda(), x, dtype, monkeypatch)
    compare(random_layer(SwitchNorm2d, chw[0], dtype=dtype).cuda(), x, dtype, monkeypatch,
            train=False)
    if chw[0] <= 512:
        for sw_type in (2, 5):
            layer = random_whitening(chw[0], dtype, sw_type=sw_type).cuda()
            compare(layer, x, dtype, monkeypatch)
