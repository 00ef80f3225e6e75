"""Triton kernels of Switchable Normalization.

SN needs, per (n, c) instance of ``x`` viewed as ``(N, C, L)`` (L = the spatial size):

* forward: the instance mean and variance (one read of x), the mixing step (one small
  program: LN over C, BN over N or the running statistics, the softmax ratios, the running
  update, writing per-instance ``scale`` and ``shift``), then ``y = x * scale + shift`` (one
  read, one write);
* backward: the sums of ``dy`` and ``dy * (x - mean_in)`` (one read of each), the closed-form
  vector-Jacobian product of the mixing step (one small program), then
  ``dx = dy * scale + (x - mean_in) * a + b`` (one read of each, one write).

Every kernel works on ``(BLOCK_C, BLOCK_L)`` tiles: BLOCK_C channels of one sample by BLOCK_L
positions. Strides are arguments, so NCHW (positions contiguous: a wide tile) and
channels_last (channels contiguous: a tall tile) are both read with coalesced loads and
without copies; the host picks the tile shape (``SNPlan`` in ``mmsn/ops/triton_switch_norm.py``).

The reductions split L when there are too few (sample, channel-block) programs to fill the
GPU, each split writing its partial result; the host merges the splits in a fixed order
(deterministic, no atomics). Statistics are accumulated in float32 (float64 for float64
inputs) relative to the instance's first element, with per-tile mean/M2 merged by Chan's
formula, so large means lose no precision.

Grids: a kernel's ``programs`` (sample, channel-block) programs times its blocks of L
(pointwise passes) or splits (reductions) are numbered flat, the program fastest, on grid
axis 0 (``library.flat_grid``): CUDA takes up to 2**31 - 1 programs there, where axes 1 and
2 stop at 65535, which the blocks of L of a channels_last 1024 x 2048 map or 128^3 volume
pass. Positions are int32, and int64 (``POSITIONS``) for maps so large that a position plus
a tile could pass 2**31 - 1; addresses are int64 throughout (``stride * position`` passes
2**31 on large maps).

The counts that only number programs and partial results (``programs``, ``NC``) are not
specialized on (``do_not_specialize``): Triton would compile a variant for each of their
values that is 1 or divisible by 16, i.e. for many new batch sizes, while the loads of x do
not depend on them.
"""
import triton
import triton.language as tl


@triton.jit
def _grid_position(programs):
    """(program, block) of this program (see the module docstring): the block of L or the
    split."""
    flat = tl.program_id(0)
    return flat % programs, flat // programs


@triton.jit
def _tile_rows(program, C, BLOCK_C: tl.constexpr):
    """Sample ``n`` (int64) of ``program``, its channel rows and their mask."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    rows = (program % c_blocks).to(tl.int32) * BLOCK_C + tl.arange(0, BLOCK_C)
    return (program // c_blocks).to(tl.int64), rows, rows < C


@triton.jit
def _tile(ptr, n, rows, row_mask, offsets, end, stride_n, stride_c, stride_l):
    """Addresses and mask of the (rows x offsets) tile of sample ``n``, positions < end."""
    at = (ptr + n * stride_n + rows[:, None].to(tl.int64) * stride_c
          + offsets[None, :].to(tl.int64) * stride_l)
    return at, row_mask[:, None] & (offsets[None, :] < end)


@triton.jit(do_not_specialize=('NC', 'programs',))
def _moments_kernel(x_ptr, pivot_ptr, mean_ptr, m2_ptr, C, L, NC, programs, chunk, stride_n,
                    stride_c, stride_l, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                    ACC: tl.constexpr, POSITIONS: tl.constexpr):
    program, split = _grid_position(programs)
    n, rows, row_mask = _tile_rows(program, C, BLOCK_C)
    # Moments of x - x[n, c, 0]: for large means the tile sums then carry no cancellation.
    pivot = tl.load(x_ptr + n * stride_n + rows.to(tl.int64) * stride_c, mask=row_mask,
                    other=0.0).to(ACC)
    count = tl.zeros((), dtype=ACC)
    mean = tl.zeros((BLOCK_C,), dtype=ACC)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    first = split.to(POSITIONS) * chunk
    end = tl.minimum(first + chunk, L)
    for start in range(first, end, BLOCK_L):
        offsets = start + tl.arange(0, BLOCK_L)
        at, mask = _tile(x_ptr, n, rows, row_mask, offsets, end, stride_n, stride_c, stride_l)
        values = tl.where(mask, tl.load(at, mask=mask, other=0.0).to(ACC) - pivot[:, None], 0.0)
        tile_count = tl.sum((offsets < end).to(ACC), axis=0)
        tile_mean = tl.sum(values, axis=1) / tile_count
        centred = tl.where(mask, values - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=1)
        # Chan et al.: merge (count, mean, m2) with the tile's
        total = count + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        m2 = m2 + tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    out = split * NC + n * C + rows
    tl.store(mean_ptr + out, mean, mask=row_mask)
    tl.store(m2_ptr + out, m2, mask=row_mask)
    if split == 0:
        tl.store(pivot_ptr + n * C + rows, pivot, mask=row_mask)


@triton.jit(do_not_specialize=('programs',))
def _affine_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, C, L, programs, stride_n, stride_c,
                   stride_l, y_stride_n, y_stride_c, y_stride_l, BLOCK_C: tl.constexpr,
                   BLOCK_L: tl.constexpr, ACC: tl.constexpr, POSITIONS: tl.constexpr):
    program, block = _grid_position(programs)
    n, rows, row_mask = _tile_rows(program, C, BLOCK_C)
    offsets = block.to(POSITIONS) * BLOCK_L + tl.arange(0, BLOCK_L)
    scale = tl.load(scale_ptr + n * C + rows, mask=row_mask, other=0.0)
    shift = tl.load(shift_ptr + n * C + rows, mask=row_mask, other=0.0)
    at, mask = _tile(x_ptr, n, rows, row_mask, offsets, L, stride_n, stride_c, stride_l)
    values = tl.load(at, mask=mask, other=0.0).to(ACC)
    y_at, _ = _tile(y_ptr, n, rows, row_mask, offsets, L, y_stride_n, y_stride_c, y_stride_l)
    tl.store(y_at, (values * scale[:, None] + shift[:, None]).to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=('NC', 'programs',))
def _grad_sums_kernel(x_ptr, dy_ptr, centre_ptr, sum_dy_ptr, sum_dyx_ptr, C, L, NC, programs,
                      chunk, stride_n, stride_c, stride_l, dy_stride_n, dy_stride_c,
                      dy_stride_l, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                      ACC: tl.constexpr, POSITIONS: tl.constexpr):
    """Sums of ``dy`` and of ``dy * (x - centre)``: centred, so large means cancel nothing."""
    program, split = _grid_position(programs)
    n, rows, row_mask = _tile_rows(program, C, BLOCK_C)
    centre = tl.load(centre_ptr + n * C + rows, mask=row_mask, other=0.0).to(ACC)
    sum_dy = tl.zeros((BLOCK_C, BLOCK_L), dtype=ACC)
    sum_dyx = tl.zeros((BLOCK_C, BLOCK_L), dtype=ACC)
    first = split.to(POSITIONS) * chunk
    end = tl.minimum(first + chunk, L)
    for start in range(first, end, BLOCK_L):
        offsets = start + tl.arange(0, BLOCK_L)
        at, mask = _tile(x_ptr, n, rows, row_mask, offsets, end, stride_n, stride_c, stride_l)
        dy_at, _ = _tile(dy_ptr, n, rows, row_mask, offsets, end, dy_stride_n, dy_stride_c,
                         dy_stride_l)
        values = tl.load(at, mask=mask, other=0.0).to(ACC)
        grads = tl.load(dy_at, mask=mask, other=0.0).to(ACC)
        sum_dy += grads
        sum_dyx += grads * (values - centre[:, None])
    # fixed-order tree reductions: deterministic, no atomics
    out = split * NC + n * C + rows
    tl.store(sum_dy_ptr + out, tl.sum(sum_dy, axis=1), mask=row_mask)
    tl.store(sum_dyx_ptr + out, tl.sum(sum_dyx, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=('programs',))
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, a_ptr, b_ptr, centre_ptr, C, L,
                       programs, stride_n, stride_c, stride_l, dy_stride_n, dy_stride_c,
                       dy_stride_l, dx_stride_n, dx_stride_c, dx_stride_l,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
                       POSITIONS: tl.constexpr):
    """``dx = dy * scale + (x - centre) * a + b``."""
    program, block = _grid_position(programs)
    n, rows, row_mask = _tile_rows(program, C, BLOCK_C)
    offsets = block.to(POSITIONS) * BLOCK_L + tl.arange(0, BLOCK_L)
    scale = tl.load(scale_ptr + n * C + rows, mask=row_mask, other=0.0)
    a = tl.load(a_ptr + n * C + rows, mask=row_mask, other=0.0)
    b = tl.load(b_ptr + n * C + rows, mask=row_mask, other=0.0)
    centre = tl.load(centre_ptr + n * C + rows, mask=row_mask, other=0.0)
    at, mask = _tile(x_ptr, n, rows, row_mask, offsets, L, stride_n, stride_c, stride_l)
    dy_at, _ = _tile(dy_ptr, n, rows, row_mask, offsets, L, dy_stride_n, dy_stride_c,
                     dy_stride_l)
    values = tl.load(at, mask=mask, other=0.0).to(ACC)
    grads = tl.load(dy_at, mask=mask, other=0.0).to(ACC)
    dx_at, _ = _tile(dx_ptr, n, rows, row_mask, offsets, L, dx_stride_n, dx_stride_c,
                     dx_stride_l)
    out = grads * scale[:, None] + (values - centre[:, None]) * a[:, None] + b[:, None]
    tl.store(dx_at, out.to(dx_ptr.dtype.element_ty), mask=mask)
