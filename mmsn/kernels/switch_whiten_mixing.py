"""Triton kernels of SW's mixing step (SW paper Eqn. 5-7) and of its vector-Jacobian product.

They work on the instance (IW) moments of ``x`` viewed as ``(N, G, c, L)``: a mean ``mu_n``
``(c,)`` and a covariance ``Sigma_n`` ``(c, c)`` per (sample n, group g), never on ``x``.

Forward, three small kernels between the moments pass and the whitening pass:

* ``_sw_batch_kernel``, one program per group: the batch (BW) moments ``mu_B``, ``Sigma_B``
  over the N samples (STAGE 0), this rank's packed part ``[N L, mean, M2]`` for the
  all-gather (STAGE 1) or every rank's parts merged in rank order (STAGE 2); the running
  statistics' update, each program its own group;
* ``_sw_mix_kernel``, one program per (n, g): the mixed mean and covariance (softmax ratios
  over the statistics of ``SW_STATISTICS[sw_type]``: BW, IW, BN = diag(BW), IN = diag(IW),
  LN = the sample's mean and variance over all C channels)::

      m = sum_k p_k mean_k,   S = sum_k q_k cov_k + eps I,   M = diag(gamma) S^{-1/2}

  with Newton's iteration for ``S^{-1/2}`` (``P_0 = I``,
  ``P_{k+1} = (3 P_k - P_k^3 S / tr S) / 2``, result ``P_T / sqrt(tr S)``), writing the
  affine map ``y = M (x - m) + beta`` of the instance. At 16 and 32 channels per group the
  iterates stay in registers; at 64 they do not fit: with ``SCRATCH`` they go through
  scratch memory, each product as rank-one updates read from there (:func:`_product`).

Backward, between the ``dy`` sums pass (``G = sum dy (x - m)^T``, ``s = sum dy``) and the
``dx`` pass ``dx = M^T dy + A (x - mu_n) + v``:

* ``_sw_mix_backward_kernel`` per (n, g): ``dM = G``, ``dm = -M^T s``,
  ``dgamma_i = sum_j G_ij W_ij``, ``dS`` through Newton's iteration (the iterates
  recomputed, then walked back), and the partial sums the ratios and LN need;
* ``_sw_batch_backward_kernel`` per group: the BW moments' gradients (summed over the
  samples; all-reduced between this kernel and the next by synchronized layers), gamma's
  and beta's, and (program 0) the ratio logits' over every instance;
* ``_sw_input_coefficients_kernel`` per (n, g): the gradient of the IW moments, as
  ``A = (dSigma + dSigma^T) / L`` and ``v = dmu / L``. With ``M`` elements behind the BW
  moments (``N L``, or the sum over ranks) and ``w = L / M``::

      dmu_n    = (p_iw + p_in) dm + dmean_ln / C + dvar_ln 2 (mu_n - mean_ln) / C
                 + w (dmu_B + (D + D^T)(mu_n - mu_B))
      dSigma_n = q_iw dS + q_in diag(dS) + dvar_ln / C I + w D

  where ``D = sum_n q_bw dS + q_bn diag(dS)`` and ``dmu_B = sum_n (p_bw + p_bn) dm``.
"""
import triton
import triton.language as tl

from .switch_norm_mixing import _count, _entry, _ratios, _scalar, mixing_jit

#: numbers per instance in the backward's partial sums: the 8 mean-ratio terms, the 8
#: covariance-ratio terms, then [sum dm, trace dS] for LN
PARTIALS = 24


@triton.jit
def _offsets(C_PER: tl.constexpr):
    """Row indices, and flat offsets of a c x c matrix (row-major)."""
    rows = tl.arange(0, C_PER)
    return rows, rows[:, None] * C_PER + rows[None, :]


@triton.jit
def _eye(C_PER: tl.constexpr, ACC: tl.constexpr):
    rows = tl.arange(0, C_PER)
    return tl.where(rows[:, None] == rows[None, :], 1.0, 0.0).to(ACC)


@triton.jit
def _total(m):
    return tl.sum(tl.sum(m, axis=1), axis=0)


@triton.jit
def _vector8(v0, v1, v2, v3, v4):
    k = tl.arange(0, 8)
    return tl.where(k == 0, v0, tl.where(k == 1, v1, tl.where(k == 2, v2, tl.where(
        k == 3, v3, tl.where(k == 4, v4, 0.0)))))


@triton.jit
def _instance(G, mean_logit_ptr, var_logit_ptr, K: tl.constexpr, LOGITS: tl.constexpr,
              C_PER: tl.constexpr, ACC: tl.constexpr):
    """This program's (n, g) instance and what every per-instance kernel starts from: its
    flat index (int64), n, g, row and matrix offsets, both ratio vectors and I."""
    instance = tl.program_id(0)
    rows, square = _offsets(C_PER)
    return (instance.to(tl.int64), instance // G, instance % G, rows, square,
            _ratios(mean_logit_ptr, K, LOGITS, ACC), _ratios(var_logit_ptr, K, LOGITS, ACC),
            _eye(C_PER, ACC))


@triton.jit
def _layer_moments(mean_ptr, cov_ptr, n, G, C_PER: tl.constexpr, ACC: tl.constexpr):
    """LN mean and variance of sample ``n`` over its G groups of c channels (two passes)."""
    rows = tl.arange(0, C_PER)
    total = tl.zeros((), dtype=ACC)
    for h in range(G):
        total += tl.sum(tl.load(mean_ptr + (n * G + h).to(tl.int64) * C_PER + rows), axis=0)
    channels = _scalar(G * C_PER, ACC)
    mean_ln = total / channels
    spread = tl.zeros((), dtype=ACC)
    for h in range(G):
        at = (n * G + h).to(tl.int64)
        deviation = tl.load(mean_ptr + at * C_PER + rows) - mean_ln
        spread += tl.sum(deviation * deviation + tl.load(cov_ptr + at * C_PER * C_PER
                                                         + rows * (C_PER + 1)), axis=0)
    return mean_ln, spread / channels


@triton.jit
def _covariances(cov_ptr, batch_cov_ptr, instance, g, C_PER: tl.constexpr, ACC: tl.constexpr):
    """The instance's IW covariance and its group's BW covariance."""
    _, square = _offsets(C_PER)
    return (tl.load(cov_ptr + instance.to(tl.int64) * C_PER * C_PER + square),
            tl.load(batch_cov_ptr + g * C_PER * C_PER + square).to(ACC))


@triton.jit
def _statistics(mean_ptr, cov_ptr, batch_mean_ptr, batch_cov_ptr, instance, n, g, G,
                K: tl.constexpr, C_PER: tl.constexpr, ACC: tl.constexpr):
    """The instance's IW moments, its group's BW moments (batch or running) and, for K >= 3,
    its sample's LN moments."""
    rows, square = _offsets(C_PER)
    at = instance.to(tl.int64)
    mu = tl.load(mean_ptr + at * C_PER + rows)
    mu_b = tl.load(batch_mean_ptr + g * C_PER + rows).to(ACC)
    cov, cov_b = _covariances(cov_ptr, batch_cov_ptr, instance, g, C_PER, ACC)
    mean_ln = tl.zeros((), dtype=ACC)
    var_ln = tl.zeros((), dtype=ACC)
    if K >= 3:
        mean_ln, var_ln = _layer_moments(mean_ptr, cov_ptr, n, G, C_PER, ACC)
    return mu, cov, mu_b, cov_b, mean_ln, var_ln


@triton.jit
def _mixed(p, q, mu, cov, mu_b, cov_b, mean_ln, var_ln, eye, eps, K: tl.constexpr):
    """Mixed mean and covariance (+ eps I) in the order of ``SW_STATISTICS[K]``."""
    mean = _entry(p, 0) * mu_b + _entry(p, 1) * mu
    mixed = _entry(q, 0) * cov_b + _entry(q, 1) * cov
    if K == 5:
        mean += _entry(p, 2) * mu_b + _entry(p, 3) * mu
        mixed += (_entry(q, 2) * cov_b + _entry(q, 3) * cov) * eye
    if K >= 3:
        mean += _entry(p, K - 1) * mean_ln
        mixed += _entry(q, K - 1) * var_ln * eye
    return mean, mixed + eps * eye


@triton.jit
def _newton_step(p, normalised, PRECISION: tl.constexpr, ACC: tl.constexpr):
    cube = tl.dot(tl.dot(p, p, input_precision=PRECISION, out_dtype=ACC), p,
                  input_precision=PRECISION, out_dtype=ACC)
    return 1.5 * p - 0.5 * tl.dot(cube, normalised, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _iterate(normalised, eye, ITERATIONS: tl.constexpr, PRECISION: tl.constexpr,
             ACC: tl.constexpr):
    p = eye
    for _ in tl.static_range(ITERATIONS):
        p = _newton_step(p, normalised, PRECISION, ACC)
    return p


@triton.jit
def _inverse_sqrt(mixed, eye, ITERATIONS: tl.constexpr, PRECISION: tl.constexpr,
                  ACC: tl.constexpr):
    trace = _total(mixed * eye)
    return _iterate(mixed / trace, eye, ITERATIONS, PRECISION, ACC) / tl.sqrt(trace)


@triton.jit
def _product(a_ptr, b_ptr, C_PER: tl.constexpr, ACC: tl.constexpr):
    """``A @ B`` of two c x c matrices in scratch memory, the operands loaded for this one
    product. From c = 32 as c rank-one updates, a column of ``A`` and a row of ``B`` loaded
    per step (mostly from L1/L2: one step of Newton's backward touches about 96 KiB at
    c = 64 in float32): ``tl.dot`` on CUDA cores (IEEE
    float32) holds whole row and column strips of its operands per thread, and Newton's
    backward then needs all 255 registers at c = 32 and spills at c = 64 whatever the warps.
    At c = 16 ``tl.dot`` fits, and the interpreter runs it much faster than the loop."""
    rows = tl.arange(0, C_PER)
    if C_PER <= 16:
        square = rows[:, None] * C_PER + rows[None, :]
        out = tl.dot(tl.load(a_ptr + square), tl.load(b_ptr + square), input_precision='ieee',
                     out_dtype=ACC)
    else:
        out = tl.zeros((C_PER, C_PER), dtype=ACC)
        for k in range(C_PER):
            column = tl.load(a_ptr + rows * C_PER + k)
            row = tl.load(b_ptr + k * C_PER + rows)
            out += column[:, None] * row[None, :]
    return out


@triton.jit
def _inverse_sqrt_scratch(mixed, eye, scratch_ptr, square, ITERATIONS: tl.constexpr,
                          KEEP: tl.constexpr, C_PER: tl.constexpr, ACC: tl.constexpr):
    """:func:`_inverse_sqrt` through scratch memory (operands as in :func:`_product`). With
    ``KEEP`` it keeps ``P_k``, ``P_k^2``, ``P_k^3`` (k < T), then ``S / tr S``, there for
    :func:`_inverse_sqrt_backward` (3T + 3 matrices); else it reuses one slot (4)."""
    size = C_PER * C_PER
    normalised_ptr = scratch_ptr + 3 * (ITERATIONS if KEEP else 1) * size
    trace = _total(mixed * eye)
    tl.store(normalised_ptr + square, mixed / trace)
    p = eye
    for k in tl.static_range(ITERATIONS):
        p_ptr = scratch_ptr + 3 * (k if KEEP else 0) * size
        square_ptr = p_ptr + size
        cube_ptr = p_ptr + 2 * size
        # (reusing one slot: P's last reads, in the products of P^2 and P^3, are behind the
        # barrier after the P^3 store)
        tl.store(p_ptr + square, p)
        tl.debug_barrier()  # (read by other threads of this program)
        tl.store(square_ptr + square, _product(p_ptr, p_ptr, C_PER, ACC))
        tl.debug_barrier()
        tl.store(cube_ptr + square, _product(square_ptr, p_ptr, C_PER, ACC))
        tl.debug_barrier()
        p = 1.5 * p - 0.5 * _product(cube_ptr, normalised_ptr, C_PER, ACC)
    return p / tl.sqrt(trace)


@triton.jit
def _newton_backward_step(grad_p, grad_normalised, p_ptr, normalised_ptr, m_ptr, g_ptr,
                          square, C_PER: tl.constexpr, ACC: tl.constexpr):
    """One step of :func:`_inverse_sqrt_backward`, back through ``P_{k+1}`` (``P_k`` at
    ``p_ptr``, then ``P_k^2`` and ``P_k^3``)."""
    size = C_PER * C_PER
    square_ptr = p_ptr + size
    tl.store(g_ptr + square, -0.5 * grad_p)
    tl.debug_barrier()  # (stored by other threads of this program)
    grad_normalised += _product(p_ptr + 2 * size, g_ptr, C_PER, ACC)
    tl.store(m_ptr + square, _product(g_ptr, normalised_ptr, C_PER, ACC))
    tl.debug_barrier()
    p_m = _product(p_ptr, m_ptr, C_PER, ACC)
    grad_p = (1.5 * grad_p + _product(m_ptr, square_ptr, C_PER, ACC)
              + _product(square_ptr, m_ptr, C_PER, ACC))
    tl.debug_barrier()
    tl.store(m_ptr + square, p_m)  # (reused: P m, for P m P)
    tl.debug_barrier()
    grad_p += _product(m_ptr, p_ptr, C_PER, ACC)
    # (the next step writes g, last read before the second barrier above, then m after its
    # own first barrier)
    return grad_p, grad_normalised


@triton.jit
def _inverse_sqrt_backward(trace, whitening, grad, scratch_ptr, square,
                           ITERATIONS: tl.constexpr, C_PER: tl.constexpr, ACC: tl.constexpr):
    """The gradient of :func:`_inverse_sqrt` (``whitening``) with respect to the mixed
    covariance (of trace ``trace``), walking back the iterates that
    :func:`_inverse_sqrt_scratch` kept; only the gradients stay in registers. With
    ``S = mixed / tr`` and ``G`` the gradient of ``P_{k+1}``, per step (every iterate is a
    polynomial in the symmetric ``S``, so symmetric itself, and no transposes appear)::

        dS += P^3 (-G / 2),   m = (-G / 2) S,   G <- 1.5 G + m P^2 + P m P + P^2 m
    """
    size = C_PER * C_PER
    normalised_ptr = scratch_ptr + 3 * ITERATIONS * size
    m_ptr = normalised_ptr + size                   # one more matrix: d loss / d P^3
    g_ptr = m_ptr + size                            # and d loss / d (P^3 S)
    grad_trace = -0.5 * _total(grad * whitening) / trace     # <grad, P_T> / (2 tr^1.5)
    grad_p = grad / tl.sqrt(trace)
    grad_normalised = tl.zeros_like(grad)
    if C_PER > 32:  # a loop (unrolled, ptxas spills on sm_80 at 64; as a loop it does at 16)
        for step in range(ITERATIONS):
            grad_p, grad_normalised = _newton_backward_step(
                grad_p, grad_normalised, scratch_ptr + 3 * (ITERATIONS - 1 - step) * size,
                normalised_ptr, m_ptr, g_ptr, square, C_PER, ACC)
    else:
        for step in tl.static_range(ITERATIONS):
            grad_p, grad_normalised = _newton_backward_step(
                grad_p, grad_normalised, scratch_ptr + 3 * (ITERATIONS - 1 - step) * size,
                normalised_ptr, m_ptr, g_ptr, square, C_PER, ACC)
    # <dS, S> / tr: the gradient of tr through S = mixed / tr
    grad_trace -= _total(grad_normalised * tl.load(normalised_ptr + square)) / trace
    return grad_normalised / trace + grad_trace * _eye(C_PER, ACC)


@mixing_jit
def _sw_batch_kernel(
        mean_ptr, cov_ptr,                  # (N, G, c), (N, G, c, c) IW moments
        parts_ptr,                          # (R, 1 + Gc + Gcc) packed moments of every rank
        batch_ptr,                          # (Gc + Gcc + 1,) out: mu_B, Sigma_B, T
        running_mean_ptr, running_cov_ptr,  # (G, c, 1), (G, c, c) the buffers
        new_mean_ptr, new_cov_ptr,          # where the updated buffers go (may alias)
        tracked_ptr,                        # () int64 num_batches_tracked (read only here)
        N, G, L, R, momentum,
        UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, STAGE: tl.constexpr,
        C_PER: tl.constexpr, ACC: tl.constexpr):
    g = tl.program_id(0)
    rows, square = _offsets(C_PER)
    row = 1 + G * C_PER + G * C_PER * C_PER
    mean = tl.zeros((C_PER,), dtype=ACC)
    cov = tl.zeros((C_PER, C_PER), dtype=ACC)
    if STAGE == 2:  # every rank's part, merged in rank order (exact for unequal counts)
        total = tl.zeros((), dtype=ACC)
        for r in range(R):
            count = tl.load(parts_ptr + r * row)
            total += count
            mean += count * tl.load(parts_ptr + r * row + 1 + g * C_PER + rows)
        mean = mean / tl.maximum(total, 1.0)
        for r in range(R):
            count = tl.load(parts_ptr + r * row)
            deviation = tl.load(parts_ptr + r * row + 1 + g * C_PER + rows) - mean
            cov += (tl.load(parts_ptr + r * row + 1 + G * C_PER + g * C_PER * C_PER + square)
                    + count * deviation[:, None] * deviation[None, :])
        cov = cov / tl.maximum(total, 1.0)
    else:  # this rank's N samples, L elements each
        total = _count(N, L, ACC)
        for n in range(N):
            mean += tl.load(mean_ptr + (n * G + g).to(tl.int64) * C_PER + rows)
        mean = mean / tl.maximum(_scalar(N, ACC), 1.0)
        for n in range(N):
            at = (n * G + g).to(tl.int64)
            deviation = tl.load(mean_ptr + at * C_PER + rows) - mean
            cov += (tl.load(cov_ptr + at * C_PER * C_PER + square)
                    + deviation[:, None] * deviation[None, :])
        cov = cov / tl.maximum(_scalar(N, ACC), 1.0)
    if STAGE == 1:
        tl.store(parts_ptr + 1 + g * C_PER + rows, mean)
        tl.store(parts_ptr + 1 + G * C_PER + g * C_PER * C_PER + square, cov * total)
        if g == 0:
            tl.store(parts_ptr, total)
    else:
        tl.store(batch_ptr + g * C_PER + rows, mean)
        tl.store(batch_ptr + G * C_PER + g * C_PER * C_PER + square, cov)
        if g == 0:
            tl.store(batch_ptr + G * C_PER + G * C_PER * C_PER, total)
        if UPDATE:  # (the counter itself is advanced by _sw_mix_kernel, launched after)
            seen = (total > 0).to(ACC)
            # (float32 division compiles to the approximate div.full.f32 on NVIDIA, as
            # every division in these kernels: within 2 ulp, which the momentum factor and
            # Bessel's correction of a running estimate can well afford)
            if CUMULATIVE:
                factor = seen / tl.maximum(tl.load(tracked_ptr).to(ACC) + seen, 1.0)
            else:
                factor = seen * momentum
            unbiased = tl.where(total > 1, total / tl.maximum(total - 1, 1.0), 1.0)
            old_mean = tl.load(running_mean_ptr + g * C_PER + rows)
            old_cov = tl.load(running_cov_ptr + g * C_PER * C_PER + square)
            new_mean = (1 - factor) * old_mean.to(ACC) + factor * mean
            new_cov = (1 - factor) * old_cov.to(ACC) + factor * cov * unbiased
            tl.debug_barrier()  # every thread has read before any writes (in place)
            tl.store(new_mean_ptr + g * C_PER + rows, new_mean.to(old_mean.dtype))
            tl.store(new_cov_ptr + g * C_PER * C_PER + square, new_cov.to(old_cov.dtype))


@mixing_jit
def _sw_mix_kernel(
        mean_ptr, cov_ptr,                  # (N, G, c), (N, G, c, c) IW moments
        batch_mean_ptr, batch_cov_ptr,      # (G, c), (G, c, c) BW moments: batch or running
        batch_ptr,                          # (Gc + Gcc + 1,) the batch buffer (eval: out)
        mean_logit_ptr, var_logit_ptr,      # (K,) logits (ratios when not LOGITS)
        weight_ptr, bias_ptr,               # (C,)
        tracked_ptr, new_tracked_ptr,       # () int64 num_batches_tracked, and its update
        matrix_ptr, centre_ptr, shift_ptr,  # (N, G, c, c), (N, G, c), (N, G, c) out
        scratch_ptr,                        # (N, G, 4, c, c) Newton's scratch (SCRATCH)
        N, G, eps,
        K: tl.constexpr, LOGITS: tl.constexpr, AFFINE: tl.constexpr, BIAS: tl.constexpr,
        BATCH: tl.constexpr, UPDATE: tl.constexpr, SCRATCH: tl.constexpr,
        ITERATIONS: tl.constexpr, C_PER: tl.constexpr, ACC: tl.constexpr,
        PRECISION: tl.constexpr):
    instance = tl.program_id(0)
    rows, square = _offsets(C_PER)
    if UPDATE:
        if instance == 0:
            total = tl.load(batch_ptr + G * C_PER + G * C_PER * C_PER)
            tracked = tl.load(tracked_ptr)
            tl.store(new_tracked_ptr, tracked + (total > 0).to(tracked.dtype))
    if not BATCH:
        if instance == 0:  # keep the running moments as read, for the backward (no count)
            for h in range(G):
                tl.store(batch_ptr + h * C_PER + rows,
                         tl.load(batch_mean_ptr + h * C_PER + rows).to(ACC))
                tl.store(batch_ptr + G * C_PER + h * C_PER * C_PER + square,
                         tl.load(batch_cov_ptr + h * C_PER * C_PER + square).to(ACC))
            tl.store(batch_ptr + G * C_PER + G * C_PER * C_PER, tl.zeros((), dtype=ACC))
    if instance < N * G:
        n = instance // G
        g = instance % G
        p = _ratios(mean_logit_ptr, K, LOGITS, ACC)
        q = _ratios(var_logit_ptr, K, LOGITS, ACC)
        eye = _eye(C_PER, ACC)
        mu, cov, mu_b, cov_b, mean_ln, var_ln = _statistics(
            mean_ptr, cov_ptr, batch_mean_ptr, batch_cov_ptr, instance, n, g, G, K, C_PER,
            ACC)
        mean, mixed = _mixed(p, q, mu, cov, mu_b, cov_b, mean_ln, var_ln, eye, eps, K)
        at = instance.to(tl.int64)
        if SCRATCH:
            matrix = _inverse_sqrt_scratch(mixed, eye, scratch_ptr + at * 4 * C_PER * C_PER,
                                           square, ITERATIONS, False, C_PER, ACC)
        else:
            matrix = _inverse_sqrt(mixed, eye, ITERATIONS, PRECISION, ACC)
        if AFFINE:
            matrix = matrix * tl.load(weight_ptr + g * C_PER + rows).to(ACC)[:, None]
        shift = tl.zeros((C_PER,), dtype=ACC)
        if BIAS:
            shift = tl.load(bias_ptr + g * C_PER + rows).to(ACC)
        tl.store(matrix_ptr + at * C_PER * C_PER + square, matrix)
        tl.store(centre_ptr + at * C_PER + rows, mean)
        tl.store(shift_ptr + at * C_PER + rows, shift)


@mixing_jit
def _sw_mix_backward_kernel(
        mean_ptr, cov_ptr, batch_mean_ptr, batch_cov_ptr,  # as for _sw_mix_kernel
        mean_logit_ptr, var_logit_ptr, weight_ptr,
        scratch_ptr,                        # (N, G, 3T + 3, c, c) scratch for Newton's backward
        outer_ptr, sum_dy_ptr,              # (S, N, G, c, c), (S, N, G, c) per-split sums
        d_cov_ptr,                          # (N, G, c, c) dS out
        d_centre_ptr,                       # (N, G, c) dm out
        d_gamma_ptr,                        # (N, G, c) per-instance terms of d gamma, out
        partial_ptr,                        # (N, G, PARTIALS) out
        N, G, S, eps,
        K: tl.constexpr, LOGITS: tl.constexpr, AFFINE: tl.constexpr,
        ITERATIONS: tl.constexpr, C_PER: tl.constexpr, ACC: tl.constexpr):
    at, n, g, rows, square, p, q, eye = _instance(G, mean_logit_ptr, var_logit_ptr, K,
                                                  LOGITS, C_PER, ACC)
    mu, cov, mu_b, cov_b, mean_ln, var_ln = _statistics(
        mean_ptr, cov_ptr, batch_mean_ptr, batch_cov_ptr, at, n, g, G, K, C_PER, ACC)
    outer = tl.zeros((C_PER, C_PER), dtype=ACC)
    sum_dy = tl.zeros((C_PER,), dtype=ACC)
    for s in range(S):  # the sums pass's splits, added in a fixed order
        outer += tl.load(outer_ptr + (s * N * G + at) * C_PER * C_PER + square)
        sum_dy += tl.load(sum_dy_ptr + (s * N * G + at) * C_PER + rows)
    _, mixed = _mixed(p, q, mu, cov, mu_b, cov_b, mean_ln, var_ln, eye, eps, K)
    scratch = scratch_ptr + at * (3 * ITERATIONS + 3) * C_PER * C_PER
    whitening = _inverse_sqrt_scratch(mixed, eye, scratch, square, ITERATIONS, True, C_PER,
                                      ACC)
    gamma = tl.full((C_PER,), 1.0, dtype=ACC)
    if AFFINE:
        gamma = tl.load(weight_ptr + g * C_PER + rows).to(ACC)
    d_centre = -tl.sum(gamma[:, None] * whitening * sum_dy[:, None], axis=0)  # -M^T s
    tl.store(d_gamma_ptr + at * C_PER + rows, tl.sum(outer * whitening, axis=1))
    tl.store(d_centre_ptr + at * C_PER + rows, d_centre)
    # the mean terms now: only these scalars, not the vectors, live through Newton's backward
    dm_mu = tl.sum(d_centre * mu, axis=0)
    dm_mu_b = tl.sum(d_centre * mu_b, axis=0)
    sum_dm = tl.sum(d_centre, axis=0)
    d_mixed = _inverse_sqrt_backward(_total(mixed * eye), whitening, gamma[:, None] * outer,
                                     scratch, square, ITERATIONS, C_PER, ACC)
    tl.store(d_cov_ptr + at * C_PER * C_PER + square, d_mixed)
    # read again rather than kept live through Newton's backward (registers)
    cov, cov_b = _covariances(cov_ptr, batch_cov_ptr, at, g, C_PER, ACC)
    d_diagonal = d_mixed * _eye(C_PER, ACC)
    ds_cov = _total(d_mixed * cov)
    ds_cov_b = _total(d_mixed * cov_b)
    trace_ds = _total(d_diagonal)
    if K == 5:
        d_p = _vector8(dm_mu_b, dm_mu, dm_mu_b, dm_mu, mean_ln * sum_dm)
        d_q = _vector8(ds_cov_b, ds_cov, _total(d_diagonal * cov_b),
                       _total(d_diagonal * cov), var_ln * trace_ds)
    else:
        d_p = _vector8(dm_mu_b, dm_mu, mean_ln * sum_dm, 0.0, 0.0)
        d_q = _vector8(ds_cov_b, ds_cov, var_ln * trace_ds, 0.0, 0.0)
    k = tl.arange(0, 8)
    row = partial_ptr + at * 24
    tl.store(row + k, d_p)
    tl.store(row + 8 + k, d_q)
    tl.store(row + 16 + k, _vector8(sum_dm, trace_ds, 0.0, 0.0, 0.0))


@mixing_jit
def _sw_batch_backward_kernel(
        d_cov_ptr, d_centre_ptr, d_gamma_ptr, sum_dy_ptr, partial_ptr,  # from above
        mean_logit_ptr, var_logit_ptr,
        grad_batch_ptr,                     # (Gc + Gcc,) out: d mu_B, D (zero when not BATCH)
        d_weight_ptr, d_bias_ptr,           # (C,) out
        d_mean_logit_ptr, d_var_logit_ptr,  # (K,) out
        N, G, S,
        K: tl.constexpr, LOGITS: tl.constexpr, AFFINE: tl.constexpr, BIAS: tl.constexpr,
        BATCH: tl.constexpr, C_PER: tl.constexpr, ACC: tl.constexpr):
    g = tl.program_id(0)
    rows, square = _offsets(C_PER)
    p = _ratios(mean_logit_ptr, K, LOGITS, ACC)
    q = _ratios(var_logit_ptr, K, LOGITS, ACC)
    d_mean = tl.zeros((C_PER,), dtype=ACC)
    d_cov = tl.zeros((C_PER, C_PER), dtype=ACC)
    d_gamma = tl.zeros((C_PER,), dtype=ACC)
    d_beta = tl.zeros((C_PER,), dtype=ACC)
    for n in range(N):
        at = (n * G + g).to(tl.int64)
        d_mean += tl.load(d_centre_ptr + at * C_PER + rows)
        d_cov += tl.load(d_cov_ptr + at * C_PER * C_PER + square)
        d_gamma += tl.load(d_gamma_ptr + at * C_PER + rows)
        for s in range(S):
            d_beta += tl.load(sum_dy_ptr + (s * N * G + at) * C_PER + rows)
    if BATCH:
        if K == 5:  # BW and BN (its diagonal)
            d_mean = (_entry(p, 0) + _entry(p, 2)) * d_mean
            d_cov = _entry(q, 0) * d_cov + _entry(q, 2) * d_cov * _eye(C_PER, ACC)
        else:
            d_mean = _entry(p, 0) * d_mean
            d_cov = _entry(q, 0) * d_cov
    else:  # the running statistics take no gradient
        d_mean = d_mean * 0
        d_cov = d_cov * 0
    tl.store(grad_batch_ptr + g * C_PER + rows, d_mean)
    tl.store(grad_batch_ptr + G * C_PER + g * C_PER * C_PER + square, d_cov)
    if AFFINE:
        tl.store(d_weight_ptr + g * C_PER + rows, d_gamma.to(d_weight_ptr.dtype.element_ty))
    if BIAS:
        tl.store(d_bias_ptr + g * C_PER + rows, d_beta.to(d_bias_ptr.dtype.element_ty))
    if g == 0:  # the ratios: over every instance, in a fixed order
        k = tl.arange(0, 8)
        d_p = tl.zeros((8,), dtype=ACC)
        d_q = tl.zeros((8,), dtype=ACC)
        for i in range(N * G):
            d_p += tl.load(partial_ptr + i * 24 + k)
            d_q += tl.load(partial_ptr + i * 24 + 8 + k)
        if LOGITS:  # through the softmax
            d_p = p * (d_p - tl.sum(p * d_p, axis=0))
            d_q = q * (d_q - tl.sum(q * d_q, axis=0))
        tl.store(d_mean_logit_ptr + k, d_p.to(d_mean_logit_ptr.dtype.element_ty), mask=k < K)
        tl.store(d_var_logit_ptr + k, d_q.to(d_var_logit_ptr.dtype.element_ty), mask=k < K)


@mixing_jit
def _sw_input_coefficients_kernel(
        mean_ptr,                           # (N, G, c) IW means
        batch_ptr,                          # (Gc + Gcc + 1,) mu_B, Sigma_B, T
        d_cov_ptr, d_centre_ptr, partial_ptr, grad_batch_ptr,  # from the kernels above
        mean_logit_ptr, var_logit_ptr,
        moment_ptr, vector_ptr,             # (N, G, c, c), (N, G, c) out: A, v
        N, G, L,
        K: tl.constexpr, LOGITS: tl.constexpr, BATCH: tl.constexpr, C_PER: tl.constexpr,
        ACC: tl.constexpr):
    at, n, g, rows, square, p, q, eye = _instance(G, mean_logit_ptr, var_logit_ptr, K,
                                                  LOGITS, C_PER, ACC)
    mu = tl.load(mean_ptr + at * C_PER + rows)
    d_centre = tl.load(d_centre_ptr + at * C_PER + rows)
    d_mixed = tl.load(d_cov_ptr + at * C_PER * C_PER + square)
    d_mean = _entry(p, 1) * d_centre
    d_cov = _entry(q, 1) * d_mixed
    if K == 5:
        d_mean += _entry(p, 3) * d_centre
        d_cov += _entry(q, 3) * d_mixed * eye
    if K >= 3:  # LN: sums over every group of the sample
        channels = _scalar(G * C_PER, ACC)
        total = tl.zeros((), dtype=ACC)
        sum_dm = tl.zeros((), dtype=ACC)
        trace_ds = tl.zeros((), dtype=ACC)
        for h in range(G):
            other = (n * G + h).to(tl.int64)
            total += tl.sum(tl.load(mean_ptr + other * C_PER + rows), axis=0)
            sum_dm += tl.load(partial_ptr + other * 24 + 16)
            trace_ds += tl.load(partial_ptr + other * 24 + 17)
        d_mean_ln = _entry(p, K - 1) * sum_dm
        d_var_ln = _entry(q, K - 1) * trace_ds
        d_mean += d_mean_ln / channels + d_var_ln * 2 * (mu - total / channels) / channels
        d_cov += d_var_ln / channels * eye
    if BATCH:  # through the BW moments (all ranks' gradients, after the all-reduce)
        weight = L / tl.maximum(tl.load(batch_ptr + G * C_PER + G * C_PER * C_PER), 1.0)
        d_batch_cov = tl.load(grad_batch_ptr + G * C_PER + g * C_PER * C_PER + square)
        deviation = mu - tl.load(batch_ptr + g * C_PER + rows)
        d_mean += weight * (tl.load(grad_batch_ptr + g * C_PER + rows) + tl.sum(
            (d_batch_cov + tl.trans(d_batch_cov)) * deviation[None, :], axis=1))
        d_cov += weight * d_batch_cov
    length = tl.maximum(_scalar(L, ACC), 1.0)
    tl.store(moment_ptr + at * C_PER * C_PER + square, (d_cov + tl.trans(d_cov)) / length)
    tl.store(vector_ptr + at * C_PER + rows, d_mean / length)
