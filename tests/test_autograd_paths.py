"""Autograd uses beyond one backward, on the kernel path (interpreted on the CPU) against the
reference: a repeated backward with retain_graph, double backward (create_graph=True) and
activation checkpointing, for SN and SW (16 channels per group). float64; 1e-6 relative:
the kernel path sums in another order than the reference."""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from mmsn import SwitchNorm2d, SwitchWhiten2d
from mmsn.ops import set_backend

pytest.importorskip('triton')


def make(kind):
    torch.manual_seed(0)
    layer = SwitchNorm2d(16) if kind == 'sn' else SwitchWhiten2d(16, num_pergroup=16, sw_type=5)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer.double()


def inputs():
    return torch.randn(3, 16, 3, 4, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.parametrize('kind', ['sn', 'sw'])
def test_retain_graph_and_repeated_backward(kind, monkeypatch):
    set_backend('triton')
    layer, x = make(kind), inputs().requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    first = torch.autograd.grad(y, x, grad, retain_graph=True)[0]
    second = torch.autograd.grad(y, x, grad)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize('kind', ['sn', 'sw'])
@pytest.mark.parametrize('train', [True, False])
def test_double_backward_matches_reference(kind, train, monkeypatch):
    results = {}
    for backend in ('torch', 'triton'):
        set_backend(backend)
        layer, x = make(kind).train(train), inputs().requires_grad_()
        y = layer(x)
        dx, = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
        assert dx.requires_grad  # never a silently detached gradient
        penalty = dx.square().sum()
        penalty.backward()
        results[backend] = [dx.detach(), x.grad] + [p.grad for p in layer.parameters()]
    for got, want in zip(results['triton'], results['torch']):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kind', ['sn', 'sw'])
@pytest.mark.parametrize('reentrant', [False, True])
def test_activation_checkpointing(kind, reentrant, monkeypatch):
    results = {}
    for backend in ('torch', 'triton'):
        set_backend(backend)
        layer, x = make(kind), inputs().requires_grad_()
        y = checkpoint(layer, x, use_reentrant=reentrant)
        y.square().sum().backward()
        # forward and recomputation each count a batch, as nn.BatchNorm2d does
        assert int(layer.num_batches_tracked) == 2
        results[backend] = ([x.grad] + [p.grad for p in layer.parameters()]
                            + [b for b in layer.buffers() if b.is_floating_point()])
    for got, want in zip(results['triton'], results['torch']):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kind', ['sn', 'sw'])
def test_gradgradcheck_on_the_kernel_path(kind, monkeypatch):
    """Second derivatives of the kernel path (whose backward, under create_graph, takes the
    reference) against finite differences of its first derivatives, float64 (weight and
    bias fixed: they enter linearly). ``fast_mode`` compares one random projection of the
    second derivatives (any wrong entry shows, barring a chance zero projection) in a few
    interpreted runs instead of one per input element (40 s for SW)."""
    set_backend('triton')
    torch.manual_seed(0)
    if kind == 'sn':
        layer = SwitchNorm2d(3).double()
        x = torch.randn(2, 3, 2, 2, dtype=torch.float64) + 0.5
    else:
        layer = SwitchWhiten2d(16, num_pergroup=16, sw_type=2, T=3).double()
        x = torch.randn(2, 16, 1, 3, dtype=torch.float64) + 0.5
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    params = [p for p in layer.parameters()]

    def run(x, *values):
        state = dict(zip((name for name, _ in layer.named_parameters()), values))
        return torch.func.functional_call(layer, state, (x,))

    # x and the ratio logits (where the second-order terms live) vary; weight and bias,
    # entering linearly, stay fixed to keep the finite differences few
    inputs = (x.requires_grad_(),) + tuple(
        p.detach().requires_grad_(p.dim() == 1 and p.numel() <= 5) for p in params)
    assert torch.autograd.gradgradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
                                        fast_mode=True)
