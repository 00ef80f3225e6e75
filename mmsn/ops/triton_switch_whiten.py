"""SW on the Triton kernels: the moments and whitening passes are kernels (``library.py``);
between them the small mixing step (BW moments and their synchronization, mixed mean and
covariance, Newton iterations, affine) runs in PyTorch on ``(N, G, c, c)`` tensors through
:func:`switch_whiten_coefficients`, the same code as the reference. The backward, and the
composed form used under torch.compile, mirror the SN ones (``triton_switch_norm.py``)."""
from typing import Optional

import torch
from torch import Tensor

from .library import (KERNEL_GROUP_SIZES, as_groups, newton_inverse_sqrt, sw_grad_input,
                      sw_grad_sums, sw_moments, sw_moments_input_coefficients, sw_whiten,
                      viewable)
from .distributed import gathered_parts
from .reference import switch_whiten_coefficients, switch_whiten_reference


def _leaf(t: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    return None if t is None else t.detach().requires_grad_(needed)


def _grad_of(leaf: Optional[Tensor]) -> Optional[Tensor]:
    return None if leaf is None else leaf.grad


class _SwitchWhitenFunction(torch.autograd.Function):
    """Forward: moments pass, mixing step (no graph kept), whitening pass. Backward: the sums
    pass, the mixing step recomputed from the saved moments (without touching the running
    statistics) and differentiated, the ``dx`` pass. Saving moments rather than a graph
    keeps ``retain_graph`` and activation checkpointing working like any other op."""

    @staticmethod
    def forward(ctx, x, mean_ratio, var_ratio, weight, bias, running_mean, running_cov,
                num_batches_tracked, use_batch_stats, num_pergroup, sw_type, iterations,
                momentum, eps, method, process_group, sync):
        mean_iw, cov_iw = sw_moments(x, num_pergroup)
        length = as_groups(x, num_pergroup).shape[3]
        with gathered_parts([]) as gathered:  # (replayed by the backward's recomputation)
            matrix, centre, shift = switch_whiten_coefficients(
                mean_iw, cov_iw, length, mean_ratio, var_ratio, weight, bias, running_mean,
                running_cov, num_batches_tracked, use_batch_stats, sw_type, iterations,
                momentum, eps, method, process_group, sync, newton_inverse_sqrt)
        ctx.gathered = gathered
        y = sw_whiten(x, matrix, centre, shift, num_pergroup)
        # eval reads the running statistics: keep them as they were for the backward
        running = (None, None) if use_batch_stats else (running_mean.clone(), running_cov.clone())
        ctx.save_for_backward(x, mean_ratio, var_ratio, weight, bias, mean_iw, cov_iw, *running)
        ctx.options = (use_batch_stats, num_pergroup, sw_type, iterations, momentum, eps, method,
                       process_group, sync)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean_ratio, var_ratio, weight, bias, mean_iw, cov_iw, running_mean, running_cov = \
            ctx.saved_tensors
        (use_batch_stats, group_size, sw_type, iterations, momentum, eps, method,
         process_group, sync) = ctx.options
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference
            inputs = (x, mean_ratio, var_ratio, weight, bias)
            with torch.enable_grad():
                y = switch_whiten_reference(
                    x, mean_ratio, var_ratio, weight, bias, running_mean, running_cov, None,
                    use_batch_stats, group_size, sw_type, iterations, momentum, eps, method,
                    process_group, sync)
                wanted = [t for t, need in zip(inputs, needs) if need]
                grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
            return tuple(next(grads) if need else None for need in needs) + (None,) * 12
        with torch.enable_grad(), gathered_parts(ctx.gathered, replay=True):
            leaves = [_leaf(mean_iw, needs[0]), _leaf(cov_iw, needs[0]),
                      _leaf(mean_ratio, needs[1]), _leaf(var_ratio, needs[2]),
                      _leaf(weight, needs[3]), _leaf(bias, needs[4])]
            matrix, centre, shift = switch_whiten_coefficients(
                leaves[0], leaves[1], as_groups(x, group_size).shape[3], *leaves[2:],
                running_mean, running_cov, None, use_batch_stats, sw_type, iterations,
                momentum, eps, method, process_group, sync, newton_inverse_sqrt)
        dy = viewable(dy, lambda t: as_groups(t, group_size))  # (once for both passes)
        outer, sum_dy = sw_grad_sums(x, dy, centre.detach(), group_size)
        # y = M (x - centre) + shift: dM = sum dy (x - centre)^T, dcentre = -M^T sum dy
        matrix_t = matrix.detach().transpose(-1, -2)
        d_centre = -torch.matmul(matrix_t, sum_dy[..., None])[..., 0]
        # the whole recomputed graph, not autograd.grad (which prunes to the leaves): a rank
        # with an empty batch must still join the synchronized backward's all-reduce
        pairs = [(t, g) for t, g in ((matrix, outer), (centre, d_centre), (shift, sum_dy))
                 if t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        dx = None
        if needs[0]:
            d_mean, d_cov = _grad_of(leaves[0]), _grad_of(leaves[1])
            d_mean = torch.zeros_like(sum_dy) if d_mean is None else d_mean
            d_cov = torch.zeros_like(outer) if d_cov is None else d_cov
            moment, vector = sw_moments_input_coefficients(d_mean, d_cov,
                                                           as_groups(x, group_size).shape[3])
            dx = sw_grad_input(x, dy, matrix_t, moment, mean_iw, vector, group_size)
        return (dx,) + tuple(_grad_of(leaf) for leaf in leaves[2:]) + (None,) * 12


def _switch_whiten_composed(x, mean_ratio, var_ratio, weight, bias, running_mean, running_cov,
                            num_batches_tracked, use_batch_stats, num_pergroup, sw_type,
                            iterations, momentum, eps, method, process_group, sync):
    """The traceable form: moments op, mixing step, whitening op, each differentiable."""
    mean_iw, cov_iw = torch.ops.mmsn.sw_moments(x, num_pergroup)
    matrix, centre, shift = switch_whiten_coefficients(
        mean_iw, cov_iw, as_groups(x, num_pergroup).shape[3], mean_ratio, var_ratio, weight,
        bias, running_mean, running_cov, num_batches_tracked, use_batch_stats, sw_type,
        iterations, momentum, eps, method, process_group, sync, newton_inverse_sqrt)
    return torch.ops.mmsn.sw_whiten(x, matrix, centre, shift, num_pergroup)


def switch_whiten_triton(x: Tensor, mean_ratio: Tensor, var_ratio: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_cov: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                         num_pergroup: int, sw_type: int, iterations: int,
                         momentum: Optional[float], eps: float, method: str = 'newton',
                         process_group: Optional[object] = None, sync: bool = False,
                         composed: bool = False) -> Tensor:
    """Switchable Whitening on the Triton kernels; arguments as for
    :func:`~mmsn.ops.reference.switch_whiten_reference`, plus ``composed`` (as for
    :func:`~mmsn.ops.triton_switch_norm.switch_norm_triton`). ``num_pergroup`` must be one
    of ``KERNEL_GROUP_SIZES``."""
    if num_pergroup not in KERNEL_GROUP_SIZES:
        raise ValueError(f'num_pergroup: expected one of {KERNEL_GROUP_SIZES} for the Triton '
                         f'kernels, got {num_pergroup}')
    apply = _switch_whiten_composed if composed else _SwitchWhitenFunction.apply
    if not composed:  # (the ops make their own views; dynamo needs no try/except here)
        x = viewable(x, lambda t: as_groups(t, num_pergroup))
    return apply(x, mean_ratio, var_ratio, weight, bias, running_mean, running_cov,
                 num_batches_tracked, use_batch_stats, num_pergroup, sw_type, iterations,
                 momentum, eps, method, process_group, sync)
