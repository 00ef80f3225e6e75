"""Pure-PyTorch Switchable Normalization and Switchable Whitening.

This is the CPU path and the oracle every fast path is tested against. It follows the
papers' equations with population (biased) statistics:

* SN (Luo et al., Eqn. 2-4): IN moments per (n, c); LN and BN moments pooled from them;
  ``y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k sigma_k^2 + eps) + beta``.
* SW (Pan et al., Eqn. 5-7): per group of ``c`` channels, batch (BW) and instance (IW)
  covariances, their diagonals (BN, IN) and a per-sample LN variance, mixed, then
  ``Sigma^{-1/2}`` by Newton's iteration on the trace-normalised matrix (or exactly by
  ``eigh``), applied to ``x - mu``.

All statistics are computed in float32 (float64 stays float64) whatever the input dtype, and
pooled with centred terms (no ``E[x^2] - E[x]^2``). The ops take the layer's ratio logits
(softmax here, in at least float32) or, with ``config.logits`` False, ratios the layer made
itself (sparsestmax, hard one-hot choices); the ``*_coefficients`` steps take ratios.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .configs import SW_STATISTICS, SNConfig, SWConfig
from .distributed import all_gather_parts, pooled_processes
from .moments import merge_covariance_moments, merge_moments, update_running_statistics


def stats_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else computes statistics in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ratios_of(weights: Tensor, logits: bool) -> Tensor:
    """Ratios from a layer's ratio inputs: the softmax of logits, computed in at least
    float32, or the ratios as given (``logits=False``)."""
    if not logits:
        return weights
    return torch.softmax(weights.to(torch.promote_types(weights.dtype, torch.float32)), 0)


def instance_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Population mean and variance of each (n, c) over the spatial dims, ``(N, C)``."""
    xs = x.to(stats_dtype(x))
    spatial = tuple(range(2, x.dim()))
    if not spatial:  # (N, C): one element per instance
        return xs, torch.zeros_like(xs)
    if xs.numel() == 0:
        return xs.new_zeros(x.shape[:2]), xs.new_zeros(x.shape[:2])
    var, mean = torch.var_mean(xs, dim=spatial, correction=0)
    return mean, var


def pooled_moments(mean: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Pools equal-sized parts: mean of means, and mean of (var + squared deviation)."""
    pooled_mean = mean.mean(dim, keepdim=True)
    pooled_var = (var + (mean - pooled_mean) ** 2).mean(dim, keepdim=True)
    return pooled_mean, pooled_var


def batch_moments(mean_in: Tensor, var_in: Tensor, numel_per_instance: int,
                  sync: Optional[object] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """BN moments per channel from the IN moments, optionally over all ranks of a group.

    Args:
        mean_in (Tensor): ``(N, C)`` instance means (N may be 0 on some ranks when synced).
        var_in (Tensor): ``(N, C)`` instance variances.
        numel_per_instance (int): elements per (n, c), i.e. the spatial size.
        sync (ProcessGroup, optional): reduce over this group's ranks (when it has more
            than one); None: this process's batch alone.

    Returns:
        tuple[Tensor, Tensor, Tensor]: mean ``(C,)``, population variance ``(C,)`` and the
        element count behind them (a scalar tensor).
    """
    n = mean_in.shape[0]
    local_count = mean_in.new_tensor(float(n * numel_per_instance))
    if n > 0:
        mean, var = (t.squeeze(0) for t in pooled_moments(mean_in, var_in, 0))
    else:
        mean = var = mean_in.new_zeros(mean_in.shape[1])
    if pooled_processes(sync) == 1:
        return mean, var, local_count
    channels = mean.shape[0]
    part = torch.cat([local_count.reshape(1), mean, var * local_count])
    parts = all_gather_parts(part, sync)
    count, mean, m2 = merge_moments(parts[:, :1], parts[:, 1:1 + channels],
                                    parts[:, 1 + channels:], dim=0)
    total = count[0]
    return mean, m2 / total.clamp(min=1), total


def switch_norm_coefficients(mean_in: Tensor, var_in: Tensor, numel_per_instance: int,
                             mean_ratio: Tensor, var_ratio: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], running_mean: Optional[Tensor],
                             running_var: Optional[Tensor],
                             num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                             momentum: Optional[float], eps: float,
                             sync: Optional[object] = None) -> Tuple[Tensor, Tensor]:
    """SN's per-(n, c) affine map from the instance moments: ``y = x * scale + shift``.

    The small step between the statistics pass and the normalize pass, shared by the
    reference and the kernels: LN moments pooled over C, BN moments over N (synchronized
    when asked, running buffers updated in training), the mixes, the affine parameters.

    Returns:
        tuple[Tensor, Tensor]: ``scale`` and ``shift``, ``(N, C)`` in the statistics dtype.
    """
    num_samples = mean_in.shape[0]
    has_bn = mean_ratio.numel() == 3
    mean_ln, var_ln = pooled_moments(mean_in, var_in, 1) if num_samples else (mean_in, var_in)
    mean_ratio = mean_ratio.to(mean_in.dtype)
    var_ratio = var_ratio.to(mean_in.dtype)
    mean = mean_ratio[0] * mean_in + mean_ratio[1] * mean_ln
    var = var_ratio[0] * var_in + var_ratio[1] * var_ln
    if has_bn:
        if use_batch_stats:
            mean_bn, var_bn, count = batch_moments(mean_in, var_in, numel_per_instance, sync)
            if running_mean is not None:
                update_running_statistics(running_mean, running_var, mean_bn, var_bn, count,
                                          momentum, num_batches_tracked)
        else:
            if running_mean is None:
                raise ValueError('use_batch_stats=False needs running_mean and running_var')
            mean_bn, var_bn = running_mean.to(mean_in.dtype), running_var.to(mean_in.dtype)
        mean = mean + mean_ratio[2] * mean_bn
        var = var + var_ratio[2] * var_bn
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def switch_norm_reference(x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                          weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], config: SNConfig, *,
                          use_batch_stats: bool, sync: Optional[object] = None) -> Tensor:
    """Switchable Normalization, the reference path.

    Args:
        x (Tensor): ``(N, C, *)`` input, any float dtype and memory format.
        mean_weight (Tensor): ``(3,)`` ratio logits (``config.logits``) or ratios for the
            IN, LN, BN means (``(2,)`` for IN, LN when the layer has no BN branch).
        var_weight (Tensor): the same for variances.
        weight (Tensor, optional): ``(C,)`` scale. bias (Tensor, optional): ``(C,)`` shift.
        running_mean (Tensor, optional): ``(C,)`` buffer, updated in place when
            ``use_batch_stats``; used as the BN mean otherwise.
        running_var (Tensor, optional): ``(C,)`` buffer holding the unbiased running variance
            (PyTorch's convention).
        num_batches_tracked (Tensor, optional): counter for ``momentum=None``.
        config (SNConfig): momentum, eps, logits.
        use_batch_stats (bool): BN branch from the batch (training) or from the buffers.
        sync (ProcessGroup, optional): the group whose whole batch the BN branch pools
            (synchronized layers); None: this process's batch.

    Returns:
        Tensor: the normalized input, same shape, dtype and memory format as ``x``.
    """
    num_samples, channels = x.shape[:2]
    mean_in, var_in = instance_moments(x)
    scale, shift = switch_norm_coefficients(
        mean_in, var_in, math.prod(x.shape[2:]), ratios_of(mean_weight, config.logits),
        ratios_of(var_weight, config.logits), weight, bias, running_mean, running_var,
        num_batches_tracked, use_batch_stats, config.momentum, config.eps, sync)
    view = (num_samples, channels) + (1,) * (x.dim() - 2)
    # One pass over x: y = x * scale + shift, computed in the statistics dtype.
    y = torch.addcmul(shift.reshape(view), x.to(scale.dtype), scale.reshape(view))
    return y.to(x.dtype)


def inverse_sqrt_newton(cov: Tensor, T: int) -> Tensor:
    """``cov^{-1/2}`` by Newton's iteration on the trace-normalised matrix (SW Eqn. 7).

    ``P_0 = I``, ``P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2`` with ``Sigma_N = Sigma / tr``;
    the result is ``P_T / sqrt(tr)``. ``cov`` is ``(..., c, c)`` symmetric positive definite.
    """
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    cov_n = cov / trace
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    p = eye
    for _ in range(T):
        p3 = torch.matmul(torch.matmul(p, p), p)
        p = 1.5 * p - 0.5 * torch.matmul(p3, cov_n)
    return p * torch.rsqrt(trace)


def inverse_sqrt_eigh(cov: Tensor) -> Tensor:
    """Exact ``cov^{-1/2} = D diag(lambda^{-1/2}) D^T`` by eigendecomposition."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return (eigvecs * torch.rsqrt(eigvals.clamp(min=torch.finfo(cov.dtype).tiny))[..., None, :]
            ) @ eigvecs.transpose(-1, -2)


def group_batch_moments(mean_iw: Tensor, cov_iw: Tensor, numel_per_instance: int,
                        sync: Optional[object] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch (BW) mean ``(G, c)`` and population covariance ``(G, c, c)`` from IW moments."""
    num_samples = mean_iw.shape[0]
    groups, c = mean_iw.shape[1:]
    counts = mean_iw.new_full((num_samples,), float(numel_per_instance))
    local_count, mean, m2 = merge_covariance_moments(counts, mean_iw, cov_iw * numel_per_instance)
    if pooled_processes(sync) > 1:
        part = torch.cat([local_count.reshape(1), mean.reshape(-1), m2.reshape(-1)])
        parts = all_gather_parts(part, sync)
        size = groups * c
        local_count, mean, m2 = merge_covariance_moments(
            parts[:, 0], parts[:, 1:1 + size].reshape(-1, groups, c),
            parts[:, 1 + size:].reshape(-1, groups, c, c))
    return mean, m2 / local_count.clamp(min=1), local_count


def group_instance_moments(x: Tensor, num_pergroup: int) -> Tuple[Tensor, Tensor]:
    """IW mean ``(N, G, c)`` and population covariance ``(N, G, c, c)`` of each sample's
    groups of ``num_pergroup`` contiguous channels, in the statistics dtype."""
    num_samples, channels = x.shape[:2]
    numel = math.prod(x.shape[2:])
    xg = x.to(stats_dtype(x)).reshape(num_samples, channels // num_pergroup, num_pergroup, numel)
    # (sums over max(L, 1): an empty map has zero moments, where ``mean`` would give NaN)
    mean_iw = xg.sum(-1) / max(numel, 1)
    centred = xg - mean_iw[..., None]
    return mean_iw, torch.matmul(centred, centred.transpose(-1, -2)) / max(numel, 1)


def switch_whiten_coefficients(mean_iw: Tensor, cov_iw: Tensor, numel_per_instance: int,
                               mean_ratio: Tensor, var_ratio: Tensor,
                               weight: Optional[Tensor], bias: Optional[Tensor],
                               running_mean: Optional[Tensor], running_cov: Optional[Tensor],
                               num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                               sw_type: int, T: int, momentum: Optional[float],
                               eps: float, method: str = 'newton',
                               sync: Optional[object] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """SW's per-(n, group) affine map from the IW moments:
    ``y = matrix @ (x - centre) + shift`` on each group of channels.

    The small step between the moments and the whitening: BW moments (synchronized when
    asked, running buffers updated in training), the mixed mean and covariance, the inverse
    square root, the affine parameters (the kernels' version:
    ``mmsn/kernels/switch_whiten_mixing.py``).

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``matrix`` ``(N, G, c, c)``, ``centre`` and ``shift``
        ``(N, G, c)``, in the statistics dtype.
    """
    num_samples, groups, c = mean_iw.shape
    dtype = mean_iw.dtype
    if use_batch_stats:
        mean_bw, cov_bw, count = group_batch_moments(mean_iw, cov_iw, numel_per_instance, sync)
        if running_mean is not None:
            update_running_statistics(running_mean, running_cov, mean_bw[..., None], cov_bw,
                                      count, momentum, num_batches_tracked)
    else:
        if running_mean is None:
            raise ValueError('use_batch_stats=False needs running_mean and running_cov')
        mean_bw, cov_bw = running_mean.to(dtype).squeeze(-1), running_cov.to(dtype)
    eye = torch.eye(c, dtype=dtype, device=mean_iw.device)
    var_in = cov_iw.diagonal(dim1=-2, dim2=-1)                     # (N, G, c)
    stats_mean, stats_cov = {}, {}
    stats_mean['bw'] = stats_mean['bn'] = mean_bw.expand_as(mean_iw)
    stats_cov['bw'] = cov_bw.expand_as(cov_iw)
    # Diagonal matrices as products with the identity (the same numbers as diag_embed, which
    # the torchscript ONNX exporter cannot write).
    stats_cov['bn'] = (cov_bw * eye).expand_as(cov_iw)
    stats_mean['iw'] = stats_mean['in'] = mean_iw
    stats_cov['iw'] = cov_iw
    stats_cov['in'] = var_in[..., None] * eye
    if 'ln' in SW_STATISTICS[sw_type]:
        # One mean and one variance per sample over all C channels (not per group).
        flat_mean = mean_iw.reshape(num_samples, groups * c)
        flat_var = var_in.reshape(num_samples, groups * c)
        mean_ln, var_ln = pooled_moments(flat_mean, flat_var, 1) if num_samples else (
            flat_mean[:, :1], flat_var[:, :1])
        stats_mean['ln'] = mean_ln[:, :, None].expand_as(mean_iw)
        stats_cov['ln'] = var_ln[:, :, None, None] * eye
    mean_ratio, var_ratio = mean_ratio.to(dtype), var_ratio.to(dtype)
    mean = sum(mean_ratio[i] * stats_mean[k] for i, k in enumerate(SW_STATISTICS[sw_type]))
    cov = sum(var_ratio[i] * stats_cov[k] for i, k in enumerate(SW_STATISTICS[sw_type]))
    cov = cov + eps * eye
    if method == 'newton':
        whitening = inverse_sqrt_newton(cov, T)
    elif method == 'eigh':
        whitening = inverse_sqrt_eigh(cov)
    else:
        raise ValueError(f"method: expected 'newton' or 'eigh', got {method!r}")
    if weight is not None:
        whitening = whitening * weight.to(dtype).reshape(groups, c, 1)
    shift = mean_iw.new_zeros(num_samples, groups, c) if bias is None else \
        bias.to(dtype).reshape(groups, c).expand(num_samples, groups, c)
    return whitening, mean, shift


def switch_whiten_reference(x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                            weight: Optional[Tensor], bias: Optional[Tensor],
                            running_mean: Optional[Tensor], running_cov: Optional[Tensor],
                            num_batches_tracked: Optional[Tensor], config: SWConfig, *,
                            use_batch_stats: bool, sync: Optional[object] = None) -> Tensor:
    """Switchable Whitening, the reference path.

    Args:
        x (Tensor): ``(N, C, H, W)`` input, ``C`` a multiple of ``config.num_pergroup``.
        mean_weight (Tensor): ``(sw_type,)`` ratio logits (``config.logits``) or ratios, in
            the order of ``SW_STATISTICS``.
        var_weight (Tensor): the same for the covariance.
        weight (Tensor, optional): ``(C,)`` scale. bias (Tensor, optional): ``(C,)`` shift.
        running_mean (Tensor, optional): ``(G, c, 1)`` buffer (the BW mean).
        running_cov (Tensor, optional): ``(G, c, c)`` buffer (unbiased BW covariance).
        num_batches_tracked (Tensor, optional): counter for ``momentum=None``.
        config (SWConfig): num_pergroup, sw_type, T, momentum, eps, method, logits.
        use_batch_stats (bool): BW/BN from the batch (training) or from the buffers.
        sync (ProcessGroup, optional): the group whose whole batch the BW branch pools
            (synchronized layers); None: this process's batch.

    Returns:
        Tensor: the whitened input, same shape, dtype and memory format as ``x``.
    """
    mean_iw, cov_iw = group_instance_moments(x, config.num_pergroup)
    matrix, centre, shift = switch_whiten_coefficients(
        mean_iw, cov_iw, math.prod(x.shape[2:]), ratios_of(mean_weight, config.logits),
        ratios_of(var_weight, config.logits), weight, bias, running_mean, running_cov,
        num_batches_tracked, use_batch_stats, config.sw_type, config.T, config.momentum,
        config.eps, config.method, sync)
    xg = x.to(mean_iw.dtype).reshape(mean_iw.shape + (math.prod(x.shape[2:]),))
    y = torch.matmul(matrix, xg - centre[..., None]) + shift[..., None]
    return y.reshape(x.shape).to(x.dtype).contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
