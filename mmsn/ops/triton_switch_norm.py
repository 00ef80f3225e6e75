"""SN on the Triton kernels: two passes over x forward, two backward.

The statistics pass and the normalize pass are kernels; between them the tiny mixing step
(LN over C, BN over N and its synchronization, softmax ratios, affine) runs in PyTorch on
``(N, C)`` tensors through :func:`switch_norm_coefficients`, the same code as the
reference. Backward reduces ``dy`` and ``dy * x`` per instance with a kernel, sends those
sums through the saved mixing graph (one all-reduce when synchronized) and writes ``dx`` in
one pass.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import stats_dtype, switch_norm_coefficients


def _block(length: int, cap: int = 1024) -> int:
    return max(16, min(cap, 1 << max(0, (length - 1).bit_length())))


def _as_ncl(t: Tensor) -> Tensor:
    """``t`` viewed as ``(N, C, L)`` without a copy (NCHW and channels_last both merge)."""
    return t.view(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _accumulator(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def instance_moments_triton(x3: Tensor) -> Tuple[Tensor, Tensor]:
    from ..kernels.switch_norm import _instance_moments_kernel
    n, c, length = x3.shape
    acc = stats_dtype(x3)
    mean = torch.zeros(n, c, dtype=acc, device=x3.device)
    var = torch.zeros(n, c, dtype=acc, device=x3.device)
    if n * c and length:
        _instance_moments_kernel[(n * c,)](x3, mean, var, c, length, *x3.stride(),
                                           BLOCK=_block(length), ACC=_accumulator(acc))
    return mean, var


def affine_triton(x3: Tensor, out3: Tensor, scale: Tensor, shift: Tensor) -> None:
    from ..kernels.switch_norm import _affine_kernel
    n, c, length = x3.shape
    block = _block(length)
    if n * c and length:
        _affine_kernel[(n * c, triton_cdiv(length, block))](
            x3, out3, scale.contiguous(), shift.contiguous(), c, length, *x3.stride(),
            *out3.stride(), BLOCK=block, ACC=_accumulator(scale.dtype))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _needs(t: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().requires_grad_(needed)


class _SwitchNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_ratio, var_ratio, weight, bias, running_mean, running_var,
                num_batches_tracked, use_batch_stats, momentum, eps, process_group, sync):
        x3 = _as_ncl(x)
        mean_in, var_in = instance_moments_triton(x3)
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [_needs(mean_in, needs[0]), _needs(var_in, needs[0]),
                      _needs(mean_ratio, needs[1]), _needs(var_ratio, needs[2]),
                      _needs(weight, needs[3]), _needs(bias, needs[4])]
            scale, shift = switch_norm_coefficients(
                leaves[0], leaves[1], x3.shape[2], *leaves[2:], running_mean, running_var,
                num_batches_tracked, use_batch_stats, momentum, eps, process_group, sync)
        y = torch.empty_like(x)
        affine_triton(x3, _as_ncl(y), scale.detach(), shift.detach())
        ctx.save_for_backward(x)
        ctx.graph = (leaves, scale, shift)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels.switch_norm import _grad_input_kernel, _grad_sums_kernel
        x, = ctx.saved_tensors
        leaves, scale, shift = ctx.graph
        ctx.graph = None
        x3 = _as_ncl(x)
        dy = viewable(dy)
        dy3 = _as_ncl(dy)
        n, c, length = x3.shape
        acc = scale.dtype
        sum_dy = torch.zeros(n, c, dtype=acc, device=x.device)
        sum_dyx = torch.zeros(n, c, dtype=acc, device=x.device)
        block = _block(length)
        if n * c and length:
            _grad_sums_kernel[(n * c,)](x3, dy3, sum_dy, sum_dyx, c, length, *x3.stride(),
                                        *dy3.stride(), BLOCK=block, ACC=_accumulator(acc))
        pairs = [(t, g) for t, g in ((scale, sum_dyx), (shift, sum_dy)) if t.requires_grad]
        if pairs:
            # d loss / d scale[n,c] = sum(dy * x), d loss / d shift[n,c] = sum(dy). The whole
            # mixing graph runs (not autograd.grad, which prunes to the leaves): a rank with
            # an empty batch must still join the synchronized backward's all-reduce.
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        grad_of = lambda leaf: None if leaf is None else leaf.grad  # noqa: E731
        dx = None
        if ctx.needs_input_grad[0]:
            d_mean, d_var = grad_of(leaves[0]), grad_of(leaves[1])
            d_mean = torch.zeros_like(sum_dy) if d_mean is None else d_mean
            d_var = torch.zeros_like(sum_dy) if d_var is None else d_var
            # mean_in = sum(x) / L, var_in = sum((x - mean_in)^2) / L
            a = 2 * d_var / max(length, 1)
            b = d_mean / max(length, 1) - a * leaves[0].detach()
            dx = torch.empty_like(x)
            dx3 = _as_ncl(dx)
            if n * c and length:
                _grad_input_kernel[(n * c, triton_cdiv(length, block))](
                    x3, dy3, dx3, scale.detach().contiguous(), a.contiguous(), b.contiguous(),
                    c, length, *x3.stride(), *dy3.stride(), *dx3.stride(), BLOCK=block,
                    ACC=_accumulator(acc))
        return (dx, grad_of(leaves[2]), grad_of(leaves[3]), grad_of(leaves[4]),
                grad_of(leaves[5]), None, None, None, None, None, None, None, None)


def viewable(t: Tensor, view=_as_ncl) -> Tensor:
    """``t`` itself when the kernels' view of it needs no copy (NCHW, channels_last), else a
    contiguous copy."""
    try:
        view(t)
        return t
    except RuntimeError:
        return t.contiguous()


def switch_norm_triton(x: Tensor, mean_ratio: Tensor, var_ratio: Tensor,
                       weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                       momentum: Optional[float], eps: float,
                       process_group: Optional[object] = None, sync: bool = False) -> Tensor:
    """Switchable Normalization on the Triton kernels; arguments as for
    :func:`~mmsn.ops.reference.switch_norm_reference`."""
    if x.dim() == 2:  # (N, C): one element per instance
        return _SwitchNormFunction.apply(
            x.unsqueeze(-1), mean_ratio, var_ratio, weight, bias, running_mean, running_var,
            num_batches_tracked, use_batch_stats, momentum, eps, process_group,
            sync).squeeze(-1)
    return _SwitchNormFunction.apply(viewable(x), mean_ratio, var_ratio, weight, bias,
                                     running_mean, running_var, num_batches_tracked,
                                     use_batch_stats, momentum, eps, process_group, sync)


__all__ = ['switch_norm_triton', 'instance_moments_triton']
