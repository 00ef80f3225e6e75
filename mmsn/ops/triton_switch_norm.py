"""SN on the Triton kernels: two passes over x forward, two backward.

The statistics pass and the normalize pass are kernels (the ``mmsn::sn_*`` ops of
``library.py``); between them the tiny mixing step (LN over C, BN over N and its
synchronization, softmax ratios, affine) runs in PyTorch on ``(N, C)`` tensors through
:func:`switch_norm_coefficients`, the same code as the reference.

Eagerly, backward reduces ``dy`` and ``dy * x`` per instance with a kernel, sends those sums
through the mixing graph saved in forward (one all-reduce when synchronized) and writes ``dx``
in one pass. torch.compile cannot trace that saved graph, so under compile the same ops are
composed with their own autograd formulas instead (see ``library.py``).
"""
from typing import Optional

import torch
from torch import Tensor

from .library import (as_ncl, in_layout_of, sn_affine, sn_grad_input, sn_grad_sums,
                      sn_moments, sn_moments_input_coefficients, viewable)
from .reference import switch_norm_coefficients


def _needs(t: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().requires_grad_(needed)


def replay_mixing_backward(outputs_and_grads) -> None:
    """Backpropagates the sums of the normalize pass through the saved mixing graph.

    The whole graph runs (not autograd.grad, which prunes to the leaves): a rank with an
    empty batch must still join the synchronized backward's all-reduce.
    """
    pairs = [(t, g) for t, g in outputs_and_grads if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def grad_of(leaf: Optional[Tensor]) -> Optional[Tensor]:
    return None if leaf is None else leaf.grad


class _SwitchNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_ratio, var_ratio, weight, bias, running_mean, running_var,
                num_batches_tracked, use_batch_stats, momentum, eps, process_group, sync):
        mean_in, var_in = sn_moments(x)
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [_needs(mean_in, needs[0]), _needs(var_in, needs[0]),
                      _needs(mean_ratio, needs[1]), _needs(var_ratio, needs[2]),
                      _needs(weight, needs[3]), _needs(bias, needs[4])]
            scale, shift = switch_norm_coefficients(
                leaves[0], leaves[1], as_ncl(x).shape[2], *leaves[2:], running_mean,
                running_var, num_batches_tracked, use_batch_stats, momentum, eps,
                process_group, sync)
        y = sn_affine(x, scale.detach(), shift.detach())
        ctx.save_for_backward(x)
        ctx.graph = (leaves, scale, shift)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, = ctx.saved_tensors
        leaves, scale, shift = ctx.graph
        ctx.graph = None
        dy = in_layout_of(dy, as_ncl(x))  # (once for both passes)
        sum_dy, sum_dyx = sn_grad_sums(x, dy, scale.dtype)
        # d loss / d scale[n,c] = sum(dy * x), d loss / d shift[n,c] = sum(dy)
        replay_mixing_backward(((scale, sum_dyx), (shift, sum_dy)))
        dx = None
        if ctx.needs_input_grad[0]:
            d_mean, d_var = grad_of(leaves[0]), grad_of(leaves[1])
            d_mean = torch.zeros_like(sum_dy) if d_mean is None else d_mean
            d_var = torch.zeros_like(sum_dy) if d_var is None else d_var
            a, b = sn_moments_input_coefficients(d_mean, d_var, leaves[0].detach(),
                                                 as_ncl(x).shape[2])
            dx = sn_grad_input(x, dy, scale.detach(), a, b)
        return (dx, grad_of(leaves[2]), grad_of(leaves[3]), grad_of(leaves[4]),
                grad_of(leaves[5]), None, None, None, None, None, None, None, None)


def _switch_norm_composed(x, mean_ratio, var_ratio, weight, bias, running_mean, running_var,
                          num_batches_tracked, use_batch_stats, momentum, eps, process_group,
                          sync):
    """The traceable form: moments op, mixing step, affine op, each differentiable."""
    mean_in, var_in = torch.ops.mmsn.sn_moments(x)
    scale, shift = switch_norm_coefficients(
        mean_in, var_in, as_ncl(x).shape[2], mean_ratio, var_ratio, weight, bias,
        running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps,
        process_group, sync)
    return torch.ops.mmsn.sn_affine(x, scale, shift)


def switch_norm_triton(x: Tensor, mean_ratio: Tensor, var_ratio: Tensor,
                       weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                       momentum: Optional[float], eps: float,
                       process_group: Optional[object] = None, sync: bool = False,
                       composed: bool = False) -> Tensor:
    """Switchable Normalization on the Triton kernels; arguments as for
    :func:`~mmsn.ops.reference.switch_norm_reference`, plus ``composed`` (the traceable
    form, used under torch.compile, instead of the fused eager backward)."""
    squeeze = x.dim() == 2  # (N, C): one element per instance
    if squeeze:
        x = x.unsqueeze(-1)
    apply = _switch_norm_composed if composed else _SwitchNormFunction.apply
    if not composed:  # (the ops make their own views; dynamo needs no try/except here)
        x = viewable(x)
    y = apply(x, mean_ratio, var_ratio, weight, bias, running_mean, running_var,
              num_batches_tracked, use_batch_stats, momentum, eps, process_group, sync)
    return y.squeeze(-1) if squeeze else y


__all__ = ['switch_norm_triton']
