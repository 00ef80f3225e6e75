"""Triton kernels of Switchable Normalization.

SN needs, per (n, c) instance of ``x`` viewed as ``(N, C, L)`` (L = the spatial size):

* forward: the instance mean and variance (one read of x), then ``y = x * scale + shift``
  with per-instance coefficients from the small mixing step (one read, one write);
* backward: the sums of ``dy`` and ``dy * x`` (one read of each), then
  ``dx = dy * scale + x * a + b`` (one read of each, one write).

All statistics are accumulated in float32 (float64 for float64 inputs), relative to the
instance's first element, with per-block mean/M2 merged by Chan's formula, so large means
lose no precision. Strides are arguments,
so NCHW and channels_last (both views as ``(N, C, L)``) run without copies.
"""
import triton
import triton.language as tl


@triton.jit
def _instance(C):
    """This program's (n, c) instance: its flat index and int64 coordinates."""
    instance = tl.program_id(0)
    return instance, (instance // C).to(tl.int64), (instance % C).to(tl.int64)


@triton.jit
def _at(ptr, n, c, offsets, stride_n, stride_c, stride_l):
    """Addresses of elements ``offsets`` of instance (n, c) of an (N, C, L) view."""
    return ptr + n * stride_n + c * stride_c + offsets.to(tl.int64) * stride_l


@triton.jit
def _instance_moments_kernel(x_ptr, mean_ptr, var_ptr, C, L, stride_n, stride_c, stride_l,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    instance, n, c = _instance(C)
    base = x_ptr + n * stride_n + c * stride_c
    # Moments of x - x[0]: for large means the block sums then carry no cancellation.
    pivot = tl.load(base).to(ACC)
    count = tl.zeros((), dtype=ACC)
    mean = tl.zeros((), dtype=ACC)
    m2 = tl.zeros((), dtype=ACC)
    for start in range(0, L, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < L
        values = tl.load(base + offsets.to(tl.int64) * stride_l, mask=mask, other=0.0).to(ACC)
        values = tl.where(mask, values - pivot, 0.0)
        block_count = tl.sum(mask.to(ACC), axis=0)
        block_mean = tl.sum(values, axis=0) / block_count
        centred = tl.where(mask, values - block_mean, 0.0)
        block_m2 = tl.sum(centred * centred, axis=0)
        # Chan et al.: merge (count, mean, m2) with the block's
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
        count = total
    tl.store(mean_ptr + instance, pivot + mean)
    tl.store(var_ptr + instance, m2 / count)


@triton.jit
def _affine_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, C, L, stride_n, stride_c, stride_l,
                   y_stride_n, y_stride_c, y_stride_l, BLOCK: tl.constexpr, ACC: tl.constexpr):
    instance, n, c = _instance(C)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < L
    scale = tl.load(scale_ptr + instance)
    shift = tl.load(shift_ptr + instance)
    values = tl.load(_at(x_ptr, n, c, offsets, stride_n, stride_c, stride_l), mask=mask,
                     other=0.0).to(ACC)
    tl.store(_at(y_ptr, n, c, offsets, y_stride_n, y_stride_c, y_stride_l),
             (values * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(x_ptr, dy_ptr, sum_dy_ptr, sum_dyx_ptr, C, L, stride_n, stride_c,
                      stride_l, dy_stride_n, dy_stride_c, dy_stride_l, BLOCK: tl.constexpr,
                      ACC: tl.constexpr):
    instance, n, c = _instance(C)
    sum_dy = tl.zeros((BLOCK,), dtype=ACC)
    sum_dyx = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, L, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < L
        values = tl.load(_at(x_ptr, n, c, offsets, stride_n, stride_c, stride_l), mask=mask,
                         other=0.0).to(ACC)
        grads = tl.load(_at(dy_ptr, n, c, offsets, dy_stride_n, dy_stride_c, dy_stride_l),
                        mask=mask, other=0.0).to(ACC)
        sum_dy += grads
        sum_dyx += grads * values
    # fixed-order tree reduction: deterministic, no atomics
    tl.store(sum_dy_ptr + instance, tl.sum(sum_dy, axis=0))
    tl.store(sum_dyx_ptr + instance, tl.sum(sum_dyx, axis=0))


@triton.jit
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, a_ptr, b_ptr, C, L, stride_n,
                       stride_c, stride_l, dy_stride_n, dy_stride_c, dy_stride_l,
                       dx_stride_n, dx_stride_c, dx_stride_l, BLOCK: tl.constexpr,
                       ACC: tl.constexpr):
    instance, n, c = _instance(C)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < L
    scale = tl.load(scale_ptr + instance)
    a = tl.load(a_ptr + instance)
    b = tl.load(b_ptr + instance)
    values = tl.load(_at(x_ptr, n, c, offsets, stride_n, stride_c, stride_l), mask=mask,
                     other=0.0).to(ACC)
    grads = tl.load(_at(dy_ptr, n, c, offsets, dy_stride_n, dy_stride_c, dy_stride_l),
                    mask=mask, other=0.0).to(ACC)
    tl.store(_at(dx_ptr, n, c, offsets, dx_stride_n, dx_stride_c, dx_stride_l),
             (grads * scale + values * a + b).to(dx_ptr.dtype.element_ty), mask=mask)
