"""Triton kernels of Switchable Whitening, on groups of ``c`` contiguous channels.

Per (n, group) instance of ``x`` viewed as ``(N, G, c, L)``:

* forward: the IW mean and covariance (one read of x; ``tl.dot`` of c x BLOCK tiles, float32
  accumulation relative to the instance's first column, so large means lose nothing; when
  there are too few instances to fill the GPU the sums are split over L and the host adds
  the splits in a fixed order, else the kernel writes the moments itself), then
  ``y = M @ (x - centre) + shift`` with ``M`` the (affine-scaled) whitening matrix from the
  small mixing step (one read, one write);
* backward: ``sum(dy (x - centre)^T)`` and ``sum(dy)`` (one read of x and dy), then
  ``dx = M^T dy + A (x - mean_iw) + v`` (one read of each, one write), where ``A`` and ``v``
  carry the gradient of the IW moments.

Between the passes, the mixing step and its vector-Jacobian product run in the small
kernels of ``switch_whiten_mixing.py``.

``c`` must be a power of two >= 16 (``tl.dot``); other group sizes use the reference. The
kernels spell the layers' names as constants: ``C_PER`` is ``c`` (``num_pergroup``), and in
``switch_whiten_mixing.py`` ``ITERATIONS`` is Newton's ``T``.

Grids and positions as for SN (``switch_norm.py``): the (n, group) instances times the blocks
of L (or the splits) numbered flat, the instance fastest, on axis 0. ``G`` and ``NG`` only
number the instances: not specialized on, as SN's ``programs``.
"""
import triton
import triton.language as tl

from .switch_norm import _grid_position


@triton.jit
def _group_tile(ptr, n, g, offsets, L, C_PER: tl.constexpr, stride_n, stride_g, stride_c,
                stride_l):
    """Addresses and mask of the (c, BLOCK) tile at ``offsets`` of instance (n, g)."""
    rows = tl.arange(0, C_PER)
    at = (ptr + n.to(tl.int64) * stride_n + g.to(tl.int64) * stride_g
          + rows[:, None].to(tl.int64) * stride_c + offsets[None, :].to(tl.int64) * stride_l)
    return at, (rows[:, None] < C_PER) & (offsets[None, :] < L)


@triton.jit
def _group_instance(NG, G, C_PER: tl.constexpr):
    """This program's (n, group) instance: its flat index (int64), n, g, its block of L (or
    split) and the channel rows."""
    instance, block = _grid_position(NG)
    return instance.to(tl.int64), instance // G, instance % G, block, tl.arange(0, C_PER)


@triton.jit(do_not_specialize=('G', 'NG'))
def _group_moments_kernel(x_ptr, pivot_ptr, total_ptr, gram_ptr, G, L, NG, chunk, stride_n,
                          stride_g, stride_c, stride_l, C_PER: tl.constexpr,
                          BLOCK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                          FINAL: tl.constexpr, POSITIONS: tl.constexpr):
    """Sums of ``x - pivot`` and their Gram matrix over this split of the instance, with
    ``pivot`` its first column; ``FINAL`` (one split): the mean into ``pivot_ptr`` and the
    population covariance into ``gram_ptr`` instead."""
    instance, n, g, split, rows = _group_instance(NG, G, C_PER)
    first, _ = _group_tile(x_ptr, n, g, tl.arange(0, 1), L, C_PER, stride_n, stride_g,
                           stride_c, stride_l)
    pivot = tl.load(first).to(ACC)                                   # (c, 1)
    total = tl.zeros((C_PER,), dtype=ACC)
    gram = tl.zeros((C_PER, C_PER), dtype=ACC)
    start_at = split.to(POSITIONS) * chunk
    end = tl.minimum(start_at + chunk, L)
    for start in range(start_at, end, BLOCK):
        at, mask = _group_tile(x_ptr, n, g, start + tl.arange(0, BLOCK), end, C_PER, stride_n,
                               stride_g, stride_c, stride_l)
        tile = tl.where(mask, tl.load(at, mask=mask, other=0.0).to(ACC) - pivot, 0.0)
        total += tl.sum(tile, axis=1)
        gram += tl.dot(tile, tl.trans(tile), input_precision=PRECISION, out_dtype=ACC)
    square = rows[:, None] * C_PER + rows[None, :]
    if FINAL:
        shift = total / L
        tl.store(pivot_ptr + instance * C_PER + rows, tl.reshape(pivot, (C_PER,)) + shift)
        tl.store(gram_ptr + instance * C_PER * C_PER + square,
                 gram / L - shift[:, None] * shift[None, :])
    else:
        out = split * NG + instance
        tl.store(total_ptr + out * C_PER + rows, total)
        tl.store(gram_ptr + out * C_PER * C_PER + square, gram)
        if split == 0:
            tl.store(pivot_ptr + instance * C_PER + rows, tl.reshape(pivot, (C_PER,)))


@triton.jit
def _load_matrix(ptr, instance, C_PER: tl.constexpr, TRANSPOSE: tl.constexpr = False):
    rows = tl.arange(0, C_PER)
    if TRANSPOSE:
        square = rows[None, :] * C_PER + rows[:, None]
    else:
        square = rows[:, None] * C_PER + rows[None, :]
    return tl.load(ptr + instance * C_PER * C_PER + square)


@triton.jit(do_not_specialize=('G', 'NG'))
def _whiten_kernel(x_ptr, y_ptr, matrix_ptr, centre_ptr, shift_ptr, G, L, NG, stride_n,
                   stride_g, stride_c, stride_l, y_stride_n, y_stride_g, y_stride_c,
                   y_stride_l, C_PER: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                   PRECISION: tl.constexpr, POSITIONS: tl.constexpr):
    instance, n, g, block, rows = _group_instance(NG, G, C_PER)
    offsets = block.to(POSITIONS) * BLOCK + tl.arange(0, BLOCK)
    matrix = _load_matrix(matrix_ptr, instance, C_PER)
    centre = tl.load(centre_ptr + instance * C_PER + rows)
    shift = tl.load(shift_ptr + instance * C_PER + rows)
    at, mask = _group_tile(x_ptr, n, g, offsets, L, C_PER, stride_n, stride_g, stride_c,
                           stride_l)
    tile = tl.where(mask, tl.load(at, mask=mask, other=0.0).to(ACC) - centre[:, None], 0.0)
    out = tl.dot(matrix, tile, input_precision=PRECISION, out_dtype=ACC) + shift[:, None]
    y_at, _ = _group_tile(y_ptr, n, g, offsets, L, C_PER, y_stride_n, y_stride_g, y_stride_c,
                          y_stride_l)
    tl.store(y_at, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=('G', 'NG'))
def _whiten_grad_sums_kernel(x_ptr, dy_ptr, centre_ptr, outer_ptr, sum_dy_ptr, G, L, NG, chunk,
                             stride_n, stride_g, stride_c, stride_l, dy_stride_n, dy_stride_g,
                             dy_stride_c, dy_stride_l, C_PER: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                             POSITIONS: tl.constexpr):
    instance, n, g, split, rows = _group_instance(NG, G, C_PER)
    centre = tl.load(centre_ptr + instance * C_PER + rows)
    outer = tl.zeros((C_PER, C_PER), dtype=ACC)
    total = tl.zeros((C_PER,), dtype=ACC)
    start_at = split.to(POSITIONS) * chunk
    end = tl.minimum(start_at + chunk, L)
    for start in range(start_at, end, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        at, mask = _group_tile(x_ptr, n, g, offsets, end, C_PER, stride_n, stride_g, stride_c,
                               stride_l)
        tile = tl.where(mask, tl.load(at, mask=mask, other=0.0).to(ACC) - centre[:, None], 0.0)
        dy_at, _ = _group_tile(dy_ptr, n, g, offsets, end, C_PER, dy_stride_n, dy_stride_g,
                               dy_stride_c, dy_stride_l)
        grads = tl.load(dy_at, mask=mask, other=0.0).to(ACC)
        outer += tl.dot(grads, tl.trans(tile), input_precision=PRECISION, out_dtype=ACC)
        total += tl.sum(grads, axis=1)
    out = split * NG + instance
    tl.store(outer_ptr + out * C_PER * C_PER + rows[:, None] * C_PER + rows[None, :], outer)
    tl.store(sum_dy_ptr + out * C_PER + rows, total)


@triton.jit(do_not_specialize=('G', 'NG'))
def _whiten_grad_input_kernel(x_ptr, dy_ptr, dx_ptr, matrix_ptr, moment_ptr, mean_ptr,
                              vector_ptr, G, L, NG, stride_n, stride_g, stride_c, stride_l,
                              dy_stride_n, dy_stride_g, dy_stride_c, dy_stride_l, dx_stride_n,
                              dx_stride_g, dx_stride_c, dx_stride_l, C_PER: tl.constexpr,
                              BLOCK: tl.constexpr, ACC: tl.constexpr,
                              PRECISION: tl.constexpr, POSITIONS: tl.constexpr):
    instance, n, g, block, rows = _group_instance(NG, G, C_PER)
    offsets = block.to(POSITIONS) * BLOCK + tl.arange(0, BLOCK)
    matrix_t = _load_matrix(matrix_ptr, instance, C_PER, TRANSPOSE=True)
    moment = _load_matrix(moment_ptr, instance, C_PER)
    mean = tl.load(mean_ptr + instance * C_PER + rows)
    vector = tl.load(vector_ptr + instance * C_PER + rows)
    at, mask = _group_tile(x_ptr, n, g, offsets, L, C_PER, stride_n, stride_g, stride_c,
                           stride_l)
    tile = tl.where(mask, tl.load(at, mask=mask, other=0.0).to(ACC) - mean[:, None], 0.0)
    dy_at, _ = _group_tile(dy_ptr, n, g, offsets, L, C_PER, dy_stride_n, dy_stride_g,
                           dy_stride_c, dy_stride_l)
    grads = tl.load(dy_at, mask=mask, other=0.0).to(ACC)
    out = (tl.dot(matrix_t, grads, input_precision=PRECISION, out_dtype=ACC)
           + tl.dot(moment, tile, input_precision=PRECISION, out_dtype=ACC) + vector[:, None])
    dx_at, _ = _group_tile(dx_ptr, n, g, offsets, L, C_PER, dx_stride_n, dx_stride_g,
                           dx_stride_c, dx_stride_l)
    tl.store(dx_at, out.to(dx_ptr.dtype.element_ty), mask=mask)
