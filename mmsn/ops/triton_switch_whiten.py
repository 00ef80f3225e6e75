"""SW on the Triton kernels: the moments and whitening passes are kernels; between them the
small mixing step (BW moments and their synchronization, mixed mean and covariance, Newton
iterations, affine) runs in PyTorch on ``(N, G, c, c)`` tensors through
:func:`switch_whiten_coefficients`, the same code as the reference. The backward mirrors
the SN one (see ``triton_switch_norm.py``)."""
import math
from typing import Optional

import torch
from torch import Tensor

from .reference import stats_dtype, switch_whiten_coefficients
from .triton_switch_norm import _accumulator, _block, _needs, triton_cdiv, viewable

#: group sizes the kernels take (``tl.dot`` needs power-of-two sides of at least 16)
KERNEL_GROUP_SIZES = (16, 32, 64)


def _as_groups(t: Tensor, per_group: int) -> Tensor:
    n, c = t.shape[:2]
    return t.view(n, c // per_group, per_group, math.prod(t.shape[2:]))


def _kernel_args(per_group: int, dtype: torch.dtype, length: int, cap: int = 128) -> dict:
    return dict(C_PER=per_group, BLOCK=_block(length, cap), ACC=_accumulator(dtype),
                PRECISION='ieee')


class _SwitchWhitenFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_ratio, var_ratio, weight, bias, running_mean, running_cov,
                num_batches_tracked, use_batch_stats, num_pergroup, sw_type, iterations,
                momentum, eps, method, process_group, sync):
        from ..kernels.switch_whiten import _group_moments_kernel, _whiten_kernel
        x4 = _as_groups(x, num_pergroup)
        n, groups, c, length = x4.shape
        acc = stats_dtype(x)
        args = _kernel_args(c, acc, length)
        mean_iw = torch.zeros(n, groups, c, dtype=acc, device=x.device)
        cov_iw = torch.zeros(n, groups, c, c, dtype=acc, device=x.device)
        if n * groups and length:
            _group_moments_kernel[(n * groups,)](x4, mean_iw, cov_iw, groups, length,
                                                 *x4.stride(), **args)
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [_needs(mean_iw, needs[0]), _needs(cov_iw, needs[0]),
                      _needs(mean_ratio, needs[1]), _needs(var_ratio, needs[2]),
                      _needs(weight, needs[3]), _needs(bias, needs[4])]
            matrix, centre, shift = switch_whiten_coefficients(
                leaves[0], leaves[1], length, *leaves[2:], running_mean, running_cov,
                num_batches_tracked, use_batch_stats, sw_type, iterations, momentum, eps,
                method, process_group, sync)
        y = torch.empty_like(x)
        y4 = _as_groups(y, num_pergroup)
        if n * groups and length:
            _whiten_kernel[(n * groups, triton_cdiv(length, args['BLOCK']))](
                x4, y4, matrix.detach().contiguous(), centre.detach().contiguous(),
                shift.detach().contiguous(), groups, length, *x4.stride(), *y4.stride(), **args)
        ctx.save_for_backward(x)
        ctx.graph = (leaves, matrix, centre, shift)
        ctx.num_pergroup = num_pergroup
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels.switch_whiten import _whiten_grad_input_kernel, _whiten_grad_sums_kernel
        x, = ctx.saved_tensors
        leaves, matrix, centre, shift = ctx.graph
        ctx.graph = None
        dy = viewable(dy, lambda t: _as_groups(t, ctx.num_pergroup))
        x4, dy4 = _as_groups(x, ctx.num_pergroup), _as_groups(dy, ctx.num_pergroup)
        n, groups, c, length = x4.shape
        args = _kernel_args(c, matrix.dtype, length)
        outer = torch.zeros(n, groups, c, c, dtype=matrix.dtype, device=x.device)
        sum_dy = torch.zeros(n, groups, c, dtype=matrix.dtype, device=x.device)
        if n * groups and length:
            _whiten_grad_sums_kernel[(n * groups,)](
                x4, dy4, centre.detach().contiguous(), outer, sum_dy, groups, length,
                *x4.stride(), *dy4.stride(), **args)
        # y = M (x - centre) + shift: dM = sum dy (x - centre)^T, dcentre = -M^T sum dy
        d_centre = -torch.matmul(matrix.detach().transpose(-1, -2), sum_dy[..., None])[..., 0]
        pairs = [(t, g) for t, g in ((matrix, outer), (centre, d_centre), (shift, sum_dy))
                 if t.requires_grad]
        if pairs:  # the whole mixing graph: an empty rank still joins the all-reduce
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        grad_of = lambda leaf: None if leaf is None else leaf.grad  # noqa: E731
        dx = None
        if ctx.needs_input_grad[0]:
            d_mean = grad_of(leaves[0])
            d_cov = grad_of(leaves[1])
            d_mean = torch.zeros_like(sum_dy) if d_mean is None else d_mean
            d_cov = torch.zeros_like(outer) if d_cov is None else d_cov
            # mean_iw = sum(x) / L, cov_iw = sum((x - mean_iw)(x - mean_iw)^T) / L
            moment = (d_cov + d_cov.transpose(-1, -2)) / max(length, 1)
            vector = d_mean / max(length, 1)
            dx = torch.empty_like(x)
            dx4 = _as_groups(dx, ctx.num_pergroup)
            if n * groups and length:
                _whiten_grad_input_kernel[(n * groups, triton_cdiv(length, args['BLOCK']))](
                    x4, dy4, dx4, matrix.detach().transpose(-1, -2).contiguous(),
                    moment.contiguous(), leaves[0].detach().contiguous(), vector.contiguous(),
                    groups, length, *x4.stride(), *dy4.stride(), *dx4.stride(), **args)
        return (dx, grad_of(leaves[2]), grad_of(leaves[3]), grad_of(leaves[4]),
                grad_of(leaves[5])) + (None,) * 12


def switch_whiten_triton(x: Tensor, mean_ratio: Tensor, var_ratio: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_cov: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                         num_pergroup: int, sw_type: int, iterations: int,
                         momentum: Optional[float], eps: float, method: str = 'newton',
                         process_group: Optional[object] = None, sync: bool = False) -> Tensor:
    """Switchable Whitening on the Triton kernels; arguments as for
    :func:`~mmsn.ops.reference.switch_whiten_reference`. ``num_pergroup`` must be one of
    ``KERNEL_GROUP_SIZES``."""
    if num_pergroup not in KERNEL_GROUP_SIZES:
        raise ValueError(f'num_pergroup: expected one of {KERNEL_GROUP_SIZES} for the Triton '
                         f'kernels, got {num_pergroup}')
    x = viewable(x, lambda t: _as_groups(t, num_pergroup))
    return _SwitchWhitenFunction.apply(x, mean_ratio, var_ratio, weight, bias, running_mean,
                                       running_cov, num_batches_tracked, use_batch_stats,
                                       num_pergroup, sw_type, iterations, momentum, eps,
                                       method, process_group, sync)
