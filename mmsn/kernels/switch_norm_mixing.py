"""Triton kernels of SN's mixing step and of its vector-Jacobian product.

The mixing step turns the instance (IN) moments of an ``(N, C)`` batch into the per-instance
affine map ``y = x * scale + shift`` (SN paper Eqn. 3-5): LN moments pooled over C, BN
moments pooled over N (or over every rank's packed moments, or the running statistics in
eval), the softmax ratios, the running-statistics update and the affine parameters. It works
on ``(N, C)`` numbers, not on x, so one program (``grid = (1,)``) sweeps them in tiles of
``BLOCK_N x BLOCK_C``; phases that read what another thread wrote are separated by
``tl.debug_barrier()`` (``__syncthreads``, which also orders global memory within a program).

Forward, per (n, c), with ratios ``p`` (means) and ``q`` (variances) over (IN, LN, BN)::

    mean = p0 mean_in + p1 mean_ln[n] + p2 mean_bn[c]
    var  = q0 var_in  + q1 var_ln[n]  + q2 var_bn[c]
    r = 1 / sqrt(var + eps),  scale = gamma[c] r,  shift = beta[c] - mean * scale

Backward, from ``g_dy = sum dy`` and ``g_dyc = sum dy (x - mean_in)`` of each (n, c)::

    d_scale = g_dyc + (mean_in - mean) g_dy        d_beta[c]  = sum_n g_dy
    d_mean  = -scale g_dy                          d_gamma[c] = sum_n d_scale r
    d_var   = -d_scale gamma r^3 / 2               d_p[k] = sum d_mean stat_k, d_q likewise
    d_mean_ln[n] = p1 sum_c d_mean,  d_var_ln[n] = q1 sum_c d_var   (BN: p2, q2, sum_n)
    d_mean_in = p0 d_mean + d_mean_ln / C + d_var_ln 2 (mean_in - mean_ln) / C
                + (d_mean_bn + d_var_bn 2 (mean_in - mean_bn)) L / M
    d_var_in  = q0 d_var + d_var_ln / C + d_var_bn L / M
    dx = dy scale + (x - mean_in) a + b  with  a = 2 d_var_in / L,  b = d_mean_in / L

where ``M`` is the element count behind the BN moments (``N L``, or the sum over ranks). The
softmax is differentiated as ``d_logit = p (d_p - sum p d_p)``.

Synchronized layers run each kernel in two stages around their collective: STAGE 1 before it
(forward: the local packed moments ``[count, mean (C), m2 (C)]``; backward: the gradients of
the BN moments, to be all-reduced), STAGE 2 after it; STAGE 0 does both without one.

``stats`` holds ``[mean_ln (N), var_ln (N), mean_bn (C), var_bn (C), M]`` in the accumulation
dtype; the backward's ``grad_stats`` holds the gradients of the first four.
"""
import inspect

import triton
import triton.language as tl


def mixing_jit(fn):
    """``triton.jit`` for the mixing kernels (SN's one program, SW's one per group or
    instance): specialized on no integer argument, with a register budget of their own.

    Triton's launcher compiles a variant per launch for every integer argument equal to 1 or
    divisible by 16. These kernels read the moments, not x, so such hints buy them little,
    while specializing on each of N, C, L, the splits and the ranks made each new batch or
    map size a new compile (seconds at 64 channels per group) at run time, and doubled the
    variants the compile check builds. Pointers keep their alignment hint: without it SW's
    mixing backward at 64 channels per group spilled 150-400 bytes a thread (unvectorized
    loads of its c x c operands), with it none; the buffers passed are whole allocations or
    views at multiples of 16 bytes, so this costs no variants in practice.
    """
    integers = [name for name, param in inspect.signature(fn).parameters.items()
                if param.annotation is not tl.constexpr and not name.endswith('_ptr')]
    kernel = triton.jit(fn, do_not_specialize=integers)
    kernel.mixing = True  # (its register budget: register_budget in mmsn/ops/launching.py)
    return kernel


@triton.jit
def _ratios(ptr, K: tl.constexpr, LOGITS: tl.constexpr, ACC: tl.constexpr):
    """The ``K <= 8`` ratios as an (8,) vector (0 past K): softmax of logits, or as given
    (SN's three, SW's up to five)."""
    k = tl.arange(0, 8)
    if LOGITS:
        logits = tl.load(ptr + k, mask=k < K, other=float('-inf')).to(ACC)
        e = tl.exp(logits - tl.max(logits, axis=0))
        return e / tl.sum(e, axis=0)
    return tl.load(ptr + k, mask=k < K, other=0.0).to(ACC)


@triton.jit
def _scalar(value, ACC: tl.constexpr):
    """An integer argument (or constant) as an ACC scalar. Not ``value.to(ACC)``: a
    constexpr, or a product of two, has no ``.to`` (the kernels of ``mixing_jit`` take no
    integer as a constant, but a caller's literal may be one); the sum is a tensor either
    way."""
    return tl.zeros((), dtype=ACC) + value


@triton.jit
def _count(N, L, ACC: tl.constexpr):
    """``N L`` elements as an ACC scalar: multiplied in floating point (the int32 product of
    two int32 arguments would overflow past 2**31)."""
    return _scalar(N, ACC) * L


@triton.jit
def _entry(vector, i):
    """Entry ``i`` of an (8,) vector, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, 8) == i, vector, 0.0), axis=0)


@triton.jit
def _nc_tile(n0, c0, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows ``ns``, columns ``cs``, flat offsets and mask of the tile at (n0, c0) of (N, C)."""
    ns = n0 + tl.arange(0, BLOCK_N)
    cs = c0 + tl.arange(0, BLOCK_C)
    return ns, cs, ns[:, None].to(tl.int64) * C + cs[None, :], (ns[:, None] < N) & (cs[None, :] < C)


@triton.jit
def _mixed_moments(p, q, mean_in, var_in, stats_ptr, ns, cs, N, C, K: tl.constexpr,
                   BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Mixed mean and variance of a tile, and the LN and BN moments they were made of."""
    mean_ln = tl.load(stats_ptr + ns, mask=ns < N, other=0.0)
    var_ln = tl.load(stats_ptr + N + ns, mask=ns < N, other=0.0)
    mean = _entry(p, 0) * mean_in + _entry(p, 1) * mean_ln[:, None]
    var = _entry(q, 0) * var_in + _entry(q, 1) * var_ln[:, None]
    mean_bn = tl.zeros((BLOCK_C,), dtype=ACC)
    var_bn = tl.zeros((BLOCK_C,), dtype=ACC)
    if K == 3:
        mean_bn = tl.load(stats_ptr + 2 * N + cs, mask=cs < C, other=0.0)
        var_bn = tl.load(stats_ptr + 2 * N + C + cs, mask=cs < C, other=0.0)
        mean = mean + _entry(p, 2) * mean_bn[None, :]
        var = var + _entry(q, 2) * var_bn[None, :]
    return mean, var, mean_ln, var_ln, mean_bn, var_bn


@triton.jit
def _merge(count, mean, m2, part_count, part_mean, part_m2):
    """Chan et al.'s merge of (count, mean, M2) with a part's; empty totals stay zero."""
    total = count + part_count
    fraction = tl.where(total > 0, part_count / tl.maximum(total, 1e-30), 0.0)
    delta = part_mean - mean
    return total, mean + delta * fraction, m2 + part_m2 + delta * delta * count * fraction


@mixing_jit
def _mix_forward_kernel(
        pivot_ptr,                          # (N, C) each instance's first element
        part_mean_ptr, part_m2_ptr,         # (S, N, C) per-split mean of x - pivot, and M2
        mean_logit_ptr, var_logit_ptr,      # (K,) logits (ratios when not LOGITS)
        weight_ptr, bias_ptr,               # (C,)
        running_mean_ptr, running_var_ptr,  # (C,) the buffers
        new_mean_ptr, new_var_ptr,          # (C,) where the updated buffers go (may alias)
        tracked_ptr, new_tracked_ptr,       # () int64 num_batches_tracked, and its update
        parts_ptr,                          # (R, 1 + 2C) packed batch moments of every rank
        mean_in_ptr, var_in_ptr,            # (N, C) IN moments: out (STAGE 0, 1), in (2)
        stats_ptr,                          # (2N + 2C + 1,) out
        scale_ptr, shift_ptr,               # (N, C) out
        N, C, L, S, chunk, R, momentum, eps,
        K: tl.constexpr, LOGITS: tl.constexpr, AFFINE: tl.constexpr, BATCH: tl.constexpr,
        UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, STAGE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    if STAGE != 2:
        # IN moments: merge the reduction's splits (fixed order), add the pivot back
        for n0 in range(0, N, BLOCK_N):
            for c0 in range(0, C, BLOCK_C):
                ns, cs, at, mask = _nc_tile(n0, c0, N, C, BLOCK_N, BLOCK_C)
                count = tl.zeros((), dtype=ACC)
                mean = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
                m2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
                for s in range(S):
                    split_count = tl.minimum(chunk, L - s * chunk).to(ACC)
                    count, mean, m2 = _merge(
                        count, mean, m2, split_count,
                        tl.load(part_mean_ptr + s * N * C + at, mask=mask, other=0.0),
                        tl.load(part_m2_ptr + s * N * C + at, mask=mask, other=0.0))
                # an empty map (L = 0) has no moments pass (S = 0): no pivot was written,
                # and its moments are zero, as the reference's
                pivot = tl.load(pivot_ptr + at, mask=tl.where(S > 0, mask, False), other=0.0)
                tl.store(mean_in_ptr + at, pivot + mean, mask=mask)
                tl.store(var_in_ptr + at, m2 / tl.maximum(_scalar(L, ACC), 1.0), mask=mask)
        tl.debug_barrier()
    if STAGE == 1:
        # this rank's BN moments, packed for the all-gather: [N L, mean (C), M2 (C)]
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            mean, var = _local_batch_moments(mean_in_ptr, var_in_ptr, c0, N, C, BLOCK_N,
                                             BLOCK_C, ACC)
            tl.store(parts_ptr + 1 + cs, mean, mask=cs < C)
            tl.store(parts_ptr + 1 + C + cs, var * _count(N, L, ACC), mask=cs < C)
        tl.store(parts_ptr, _count(N, L, ACC))
    else:
        p = _ratios(mean_logit_ptr, K, LOGITS, ACC)
        q = _ratios(var_logit_ptr, K, LOGITS, ACC)
        _layer_moments(mean_in_ptr, var_in_ptr, stats_ptr, N, C, BLOCK_N, BLOCK_C, ACC)
        if K == 3:
            _batch_moments(mean_in_ptr, var_in_ptr, running_mean_ptr, running_var_ptr,
                           new_mean_ptr, new_var_ptr, tracked_ptr, new_tracked_ptr, parts_ptr,
                           stats_ptr, N, C, L, R, momentum, BATCH, UPDATE, CUMULATIVE,
                           STAGE, BLOCK_N, BLOCK_C, ACC)
        tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            for c0 in range(0, C, BLOCK_C):
                ns, cs, at, mask = _nc_tile(n0, c0, N, C, BLOCK_N, BLOCK_C)
                mean, var, _, _, _, _ = _mixed_moments(
                    p, q, tl.load(mean_in_ptr + at, mask=mask, other=0.0),
                    tl.load(var_in_ptr + at, mask=mask, other=0.0), stats_ptr, ns, cs, N, C,
                    K, BLOCK_C, ACC)
                scale = 1.0 / tl.sqrt(var + eps)
                if AFFINE:
                    scale = scale * tl.load(weight_ptr + cs, mask=cs < C, other=0.0).to(ACC)[None, :]
                shift = -mean * scale
                if AFFINE:
                    shift = shift + tl.load(bias_ptr + cs, mask=cs < C, other=0.0).to(ACC)[None, :]
                tl.store(scale_ptr + at, scale, mask=mask)
                tl.store(shift_ptr + at, shift, mask=mask)


@triton.jit
def _pool_tile(mean_in_ptr, var_in_ptr, at, mask, tile_count, count, mean, m2, var_sum,
               AXIS: tl.constexpr):
    """One step of pooling instance moments of equal-size instances over ``AXIS`` of an
    (n, c) tile (1: LN over channels, 0: BN over samples): adds the tile's instance
    variances to ``var_sum`` and Chan-merges its instance means into (count, mean, m2)."""
    means = tl.load(mean_in_ptr + at, mask=mask, other=0.0)
    var_sum += tl.sum(tl.load(var_in_ptr + at, mask=mask, other=0.0), axis=AXIS)
    tile_mean = tl.sum(means, axis=AXIS) / tile_count
    deviation = tl.where(mask, means - tl.expand_dims(tile_mean, AXIS), 0.0)
    count, mean, m2 = _merge(count, mean, m2, tile_count, tile_mean,
                             tl.sum(deviation * deviation, axis=AXIS))
    return count, mean, m2, var_sum


@triton.jit
def _layer_moments(mean_in_ptr, var_in_ptr, stats_ptr, N, C, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """LN moments of each sample from its C instances (equal sizes): Chan over the columns."""
    for n0 in range(0, N, BLOCK_N):
        count = tl.zeros((), dtype=ACC)
        mean = tl.zeros((BLOCK_N,), dtype=ACC)
        m2 = tl.zeros((BLOCK_N,), dtype=ACC)
        var_sum = tl.zeros((BLOCK_N,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            ns, cs, at, mask = _nc_tile(n0, c0, N, C, BLOCK_N, BLOCK_C)
            count, mean, m2, var_sum = _pool_tile(
                mean_in_ptr, var_in_ptr, at, mask, tl.minimum(C - c0, BLOCK_C).to(ACC),
                count, mean, m2, var_sum, 1)
        ns = n0 + tl.arange(0, BLOCK_N)
        tl.store(stats_ptr + ns, mean, mask=ns < N)
        tl.store(stats_ptr + N + ns, (var_sum + m2) / C, mask=ns < N)


@triton.jit
def _local_batch_moments(mean_in_ptr, var_in_ptr, c0, N, C, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """BN mean and population variance of channels ``c0 + [0, BLOCK_C)`` over this rank's N
    instances (equal sizes): Chan over the rows; zero for N = 0."""
    count = tl.zeros((), dtype=ACC)
    mean = tl.zeros((BLOCK_C,), dtype=ACC)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    var_sum = tl.zeros((BLOCK_C,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        ns, cs, at, mask = _nc_tile(n0, c0, N, C, BLOCK_N, BLOCK_C)
        count, mean, m2, var_sum = _pool_tile(
            mean_in_ptr, var_in_ptr, at, mask, tl.minimum(N - n0, BLOCK_N).to(ACC),
            count, mean, m2, var_sum, 0)
    return mean, (var_sum + m2) / tl.maximum(count, 1.0)


@triton.jit
def _batch_moments(mean_in_ptr, var_in_ptr, running_mean_ptr, running_var_ptr, new_mean_ptr,
                   new_var_ptr, tracked_ptr, new_tracked_ptr, parts_ptr, stats_ptr, N, C, L, R,
                   momentum, BATCH: tl.constexpr, UPDATE: tl.constexpr,
                   CUMULATIVE: tl.constexpr, STAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """BN moments into ``stats`` (from this rank, every rank's parts, or the buffers), and
    the running update in place: every thread reads before any writes (barriers)."""
    if BATCH:
        total = _count(N, L, ACC)
        if STAGE == 2:
            total = tl.zeros((), dtype=ACC)
            for r in range(R):
                total += tl.load(parts_ptr + r * (1 + 2 * C))
        tracked = tl.load(tracked_ptr)
        seen = total > 0
        new_tracked = tracked + seen.to(tracked.dtype)
        # (float32 division compiles to the approximate div.full.f32 on NVIDIA, as every
        # division in these kernels: within 2 ulp, which the momentum factor and Bessel's
        # correction of a running estimate can well afford)
        if CUMULATIVE:
            factor = seen.to(ACC) / tl.maximum(new_tracked.to(ACC), 1.0)
        else:
            factor = seen.to(ACC) * momentum
        unbiased = tl.where(total > 1, total / tl.maximum(total - 1, 1.0), 1.0)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            if STAGE == 2:  # every rank's packed moments, merged in rank order
                count = tl.zeros((), dtype=ACC)
                mean = tl.zeros((BLOCK_C,), dtype=ACC)
                m2 = tl.zeros((BLOCK_C,), dtype=ACC)
                for r in range(R):
                    row = parts_ptr + r * (1 + 2 * C)
                    count, mean, m2 = _merge(count, mean, m2, tl.load(row),
                                             tl.load(row + 1 + cs, mask=cs < C, other=0.0),
                                             tl.load(row + 1 + C + cs, mask=cs < C, other=0.0))
                var = m2 / tl.maximum(count, 1.0)
            else:
                mean, var = _local_batch_moments(mean_in_ptr, var_in_ptr, c0, N, C, BLOCK_N,
                                                 BLOCK_C, ACC)
            tl.store(stats_ptr + 2 * N + cs, mean, mask=cs < C)
            tl.store(stats_ptr + 2 * N + C + cs, var, mask=cs < C)
            if UPDATE:
                old_mean = tl.load(running_mean_ptr + cs, mask=cs < C, other=0.0)
                old_var = tl.load(running_var_ptr + cs, mask=cs < C, other=0.0)
                new_mean = (1 - factor) * old_mean.to(ACC) + factor * mean
                new_var = (1 - factor) * old_var.to(ACC) + factor * var * unbiased
                tl.debug_barrier()
                tl.store(new_mean_ptr + cs, new_mean.to(old_mean.dtype), mask=cs < C)
                tl.store(new_var_ptr + cs, new_var.to(old_var.dtype), mask=cs < C)
        if UPDATE:
            tl.debug_barrier()
            tl.store(new_tracked_ptr, new_tracked)
        tl.store(stats_ptr + 2 * N + 2 * C, total)
    else:  # eval: the running statistics
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            tl.store(stats_ptr + 2 * N + cs,
                     tl.load(running_mean_ptr + cs, mask=cs < C, other=0.0).to(ACC), mask=cs < C)
            tl.store(stats_ptr + 2 * N + C + cs,
                     tl.load(running_var_ptr + cs, mask=cs < C, other=0.0).to(ACC), mask=cs < C)
        tl.store(stats_ptr + 2 * N + 2 * C, _count(N, L, ACC))


@triton.jit
def _tile_gradients(n0, c0, sum_dy_ptr, sum_dyc_ptr, mean_in_ptr, var_in_ptr, stats_ptr,
                    weight_ptr, p, q, N, C, S, eps, K: tl.constexpr, AFFINE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The mixing step's gradients on one tile (see the module docstring), zero off the
    batch: d_mean, d_var, g_dy, d_scale * r and the moments they were made of."""
    ns, cs, at, mask = _nc_tile(n0, c0, N, C, BLOCK_N, BLOCK_C)
    g_dy = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    g_dyc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for s in range(S):  # the sums pass's splits, added in a fixed order
        g_dy += tl.load(sum_dy_ptr + s * N * C + at, mask=mask, other=0.0)
        g_dyc += tl.load(sum_dyc_ptr + s * N * C + at, mask=mask, other=0.0)
    mean_in = tl.load(mean_in_ptr + at, mask=mask, other=0.0)
    var_in = tl.load(var_in_ptr + at, mask=mask, other=0.0)
    mean, var, mean_ln, var_ln, mean_bn, var_bn = _mixed_moments(
        p, q, mean_in, var_in, stats_ptr, ns, cs, N, C, K, BLOCK_C, ACC)
    r = 1.0 / tl.sqrt(var + eps)
    gamma = tl.full((BLOCK_N, BLOCK_C), 1.0, dtype=ACC)
    if AFFINE:
        gamma = gamma * tl.load(weight_ptr + cs, mask=cs < C, other=0.0).to(ACC)[None, :]
    d_scale = g_dyc + (mean_in - mean) * g_dy
    d_mean = tl.where(mask, -gamma * r * g_dy, 0.0)
    d_var = tl.where(mask, -0.5 * d_scale * gamma * r * r * r, 0.0)
    return (ns, cs, at, mask, d_mean, d_var, g_dy, tl.where(mask, d_scale * r, 0.0), mean_in,
            var_in, mean_ln, var_ln, mean_bn, var_bn)


@triton.jit
def _ratio_gradient(p, d_p0, d_p1, d_p2, ptr, K: tl.constexpr, LOGITS: tl.constexpr):
    k = tl.arange(0, 8)
    d_p = tl.where(k == 0, d_p0, tl.where(k == 1, d_p1, tl.where(k == 2, d_p2, 0.0)))
    if LOGITS:  # through the softmax
        d_p = p * (d_p - tl.sum(p * d_p, axis=0))
    tl.store(ptr + k, d_p.to(ptr.dtype.element_ty), mask=k < K)


@mixing_jit
def _mix_backward_kernel(
        sum_dy_ptr, sum_dyc_ptr,            # (S, N, C) per-split sums of dy, dy (x - mean_in)
        mean_in_ptr, var_in_ptr, stats_ptr,  # (N, C), (N, C), (2N + 2C + 1,) from the forward
        mean_logit_ptr, var_logit_ptr, weight_ptr,  # (K,), (K,), (C,)
        grad_stats_ptr,                     # (2N + 2C,) gradients of the LN and BN moments
        d_mean_logit_ptr, d_var_logit_ptr,  # (K,) out
        d_weight_ptr, d_bias_ptr,           # (C,) out
        a_ptr, b_ptr,                       # (N, C) out: dx = dy scale + (x - mean_in) a + b
        N, C, L, S, eps,
        K: tl.constexpr, LOGITS: tl.constexpr, AFFINE: tl.constexpr, BATCH: tl.constexpr,
        STAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr):
    p = _ratios(mean_logit_ptr, K, LOGITS, ACC)
    q = _ratios(var_logit_ptr, K, LOGITS, ACC)
    if STAGE != 2:
        # per sample: the LN moments' gradients
        for n0 in range(0, N, BLOCK_N):
            d_mean_ln = tl.zeros((BLOCK_N,), dtype=ACC)
            d_var_ln = tl.zeros((BLOCK_N,), dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                (_, _, _, _, d_mean, d_var, _, _, _, _, _, _, _, _) = _tile_gradients(
                    n0, c0, sum_dy_ptr, sum_dyc_ptr, mean_in_ptr, var_in_ptr, stats_ptr,
                    weight_ptr, p, q, N, C, S, eps, K, AFFINE, BLOCK_N, BLOCK_C, ACC)
                d_mean_ln += tl.sum(d_mean, axis=1)
                d_var_ln += tl.sum(d_var, axis=1)
            ns = n0 + tl.arange(0, BLOCK_N)
            tl.store(grad_stats_ptr + ns, _entry(p, 1) * d_mean_ln, mask=ns < N)
            tl.store(grad_stats_ptr + N + ns, _entry(q, 1) * d_var_ln, mask=ns < N)
        # per channel: the BN moments', gamma's and beta's gradients; the ratios' over all
        d_p0 = tl.zeros((), dtype=ACC)
        d_p1 = tl.zeros((), dtype=ACC)
        d_p2 = tl.zeros((), dtype=ACC)
        d_q0 = tl.zeros((), dtype=ACC)
        d_q1 = tl.zeros((), dtype=ACC)
        d_q2 = tl.zeros((), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            d_mean_bn = tl.zeros((BLOCK_C,), dtype=ACC)
            d_var_bn = tl.zeros((BLOCK_C,), dtype=ACC)
            d_gamma = tl.zeros((BLOCK_C,), dtype=ACC)
            d_beta = tl.zeros((BLOCK_C,), dtype=ACC)
            for n0 in range(0, N, BLOCK_N):
                (ns, cs, at, mask, d_mean, d_var, g_dy, d_gamma_terms, mean_in, var_in,
                 mean_ln, var_ln, mean_bn, var_bn) = _tile_gradients(
                    n0, c0, sum_dy_ptr, sum_dyc_ptr, mean_in_ptr, var_in_ptr, stats_ptr,
                    weight_ptr, p, q, N, C, S, eps, K, AFFINE, BLOCK_N, BLOCK_C, ACC)
                d_mean_bn += tl.sum(d_mean, axis=0)
                d_var_bn += tl.sum(d_var, axis=0)
                d_gamma += tl.sum(d_gamma_terms, axis=0)
                d_beta += tl.sum(g_dy, axis=0)
                d_p0 += tl.sum(tl.sum(d_mean * mean_in, axis=1), axis=0)
                d_p1 += tl.sum(tl.sum(d_mean * mean_ln[:, None], axis=1), axis=0)
                d_p2 += tl.sum(tl.sum(d_mean * mean_bn[None, :], axis=1), axis=0)
                d_q0 += tl.sum(tl.sum(d_var * var_in, axis=1), axis=0)
                d_q1 += tl.sum(tl.sum(d_var * var_ln[:, None], axis=1), axis=0)
                d_q2 += tl.sum(tl.sum(d_var * var_bn[None, :], axis=1), axis=0)
            cs = c0 + tl.arange(0, BLOCK_C)
            if AFFINE:
                tl.store(d_weight_ptr + cs, d_gamma.to(d_weight_ptr.dtype.element_ty),
                         mask=cs < C)
                tl.store(d_bias_ptr + cs, d_beta.to(d_bias_ptr.dtype.element_ty), mask=cs < C)
            if BATCH and K == 3:
                d_mean_bn = _entry(p, 2) * d_mean_bn
                d_var_bn = _entry(q, 2) * d_var_bn
            else:  # the running statistics take no gradient
                d_mean_bn = d_mean_bn * 0
                d_var_bn = d_var_bn * 0
            tl.store(grad_stats_ptr + 2 * N + cs, d_mean_bn, mask=cs < C)
            tl.store(grad_stats_ptr + 2 * N + C + cs, d_var_bn, mask=cs < C)
        _ratio_gradient(p, d_p0, d_p1, d_p2, d_mean_logit_ptr, K, LOGITS)
        _ratio_gradient(q, d_q0, d_q1, d_q2, d_var_logit_ptr, K, LOGITS)
        tl.debug_barrier()
    if STAGE != 1:
        # per instance: the gradient of the IN moments, as dx's coefficients
        total = tl.load(stats_ptr + 2 * N + 2 * C)
        length = _scalar(L, ACC)
        batch_weight = length / tl.maximum(total, 1.0)
        length = tl.maximum(length, 1.0)  # (an empty map: a and b are never applied)
        for n0 in range(0, N, BLOCK_N):
            for c0 in range(0, C, BLOCK_C):
                (ns, cs, at, mask, d_mean, d_var, g_dy, d_gamma_terms, mean_in, var_in,
                 mean_ln, var_ln, mean_bn, var_bn) = _tile_gradients(
                    n0, c0, sum_dy_ptr, sum_dyc_ptr, mean_in_ptr, var_in_ptr, stats_ptr,
                    weight_ptr, p, q, N, C, S, eps, K, AFFINE, BLOCK_N, BLOCK_C, ACC)
                d_mean_ln = tl.load(grad_stats_ptr + ns, mask=ns < N, other=0.0)[:, None]
                d_var_ln = tl.load(grad_stats_ptr + N + ns, mask=ns < N, other=0.0)[:, None]
                d_mean_bn = tl.load(grad_stats_ptr + 2 * N + cs, mask=cs < C, other=0.0)[None, :]
                d_var_bn = tl.load(grad_stats_ptr + 2 * N + C + cs, mask=cs < C,
                                   other=0.0)[None, :]
                d_mean_in = (_entry(p, 0) * d_mean + d_mean_ln / C
                             + d_var_ln * 2 * (mean_in - mean_ln[:, None]) / C
                             + (d_mean_bn + d_var_bn * 2 * (mean_in - mean_bn[None, :]))
                             * batch_weight)
                d_var_in = _entry(q, 0) * d_var + d_var_ln / C + d_var_bn * batch_weight
                tl.store(a_ptr + at, 2 * d_var_in / length, mask=mask)
                tl.store(b_ptr + at, d_mean_in / length, mask=mask)
