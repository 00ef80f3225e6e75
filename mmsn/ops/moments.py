"""Exact merging of first and second moments.

Every statistic mmsn mixes (LN and BN from IN, the batch over processes, the batch
covariance of SW) is a merge of partial moments. They are merged with Chan's formula,
``M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2``, so no ``E[x^2] - E[x]^2`` cancellation
happens, whatever the magnitude of the mean.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor, dim: int,
                  keepdim: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Merges per-part (count, mean, M2) along ``dim``.

    Args:
        count (Tensor): element count of each part, broadcastable to ``mean``.
        mean (Tensor): mean of each part.
        m2 (Tensor): sum of squared deviations from the part's own mean.
        dim (int): the dimension that indexes the parts.
        keepdim (bool): keep ``dim`` with size 1. Defaults to False.

    Returns:
        tuple[Tensor, Tensor, Tensor]: total count, merged mean and merged M2. Parts with
        zero count contribute nothing; a zero total gives a zero mean and M2, not NaN.
    """
    count = count.expand_as(mean)
    total = count.sum(dim, keepdim=True)
    merged_mean = (count * mean).sum(dim, keepdim=True) / total.clamp(min=1)
    merged_m2 = (m2 + count * (mean - merged_mean) ** 2).sum(dim, keepdim=True)
    if not keepdim:
        total, merged_mean, merged_m2 = (t.squeeze(dim) for t in (total, merged_mean, merged_m2))
    return total, merged_mean, merged_m2


def merge_covariance_moments(count: Tensor, mean: Tensor, m2: Tensor,
                             dim: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Merges per-part (count, mean vector, M2 matrix) along ``dim``.

    Args:
        count (Tensor): element count of each part, shape ``(P,)`` when ``dim=0``.
        mean (Tensor): part means, ``(P, ..., c)``.
        m2 (Tensor): part scatter matrices ``sum (x - mean_i)(x - mean_i)^T``, ``(P, ..., c, c)``.
        dim (int): the parts dimension (must be a leading dimension of all three). Defaults to 0.

    Returns:
        tuple[Tensor, Tensor, Tensor]: total count (scalar), merged mean ``(..., c)`` and
        merged scatter matrix ``(..., c, c)``.
    """
    shape = [1] * mean.dim()
    shape[dim] = -1
    weights = count.reshape(shape)
    total = count.sum()
    merged_mean = (weights * mean).sum(dim) / total.clamp(min=1)
    deviation = mean - merged_mean.unsqueeze(dim)
    between = (weights.unsqueeze(-1) * deviation.unsqueeze(-1) * deviation.unsqueeze(-2)).sum(dim)
    return total, merged_mean, m2.sum(dim) + between


def unbiased_scale(count: Tensor) -> Tensor:
    """Bessel's factor ``n / (n - 1)`` for running estimates, 1 where ``n <= 1``."""
    count = count.to(torch.promote_types(count.dtype, torch.float32))  # (float64 stays)
    return torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))


def update_running_statistics(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor,
                              batch_var: Tensor, count: Tensor, momentum: Optional[float],
                              num_batches_tracked: Optional[Tensor]) -> None:
    """Updates running mean and (co)variance buffers in place, PyTorch's convention.

    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch
    (co)variance; ``momentum=None`` gives the cumulative average over the batches counted by
    ``num_batches_tracked``. A batch of no elements (``count`` 0 on every rank) changes
    nothing. Tensor arithmetic only: no host synchronization on GPUs.
    """
    seen = count > 0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(seen.to(num_batches_tracked.dtype))
    dtype = running_mean.dtype
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError('momentum=None (cumulative average) needs num_batches_tracked')
        factor = seen.to(dtype) / num_batches_tracked.clamp(min=1).to(dtype)
    else:
        factor = seen.to(dtype) * momentum
    for running, batch in ((running_mean, batch_mean),
                           (running_var, batch_var * unbiased_scale(count))):
        running.mul_(1 - factor).add_(factor * batch.detach().to(dtype))
