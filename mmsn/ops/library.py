"""The Triton kernel launches, each also registered as a ``torch.library`` custom op
(``torch.ops.mmsn.<name>``).

Each launch is one kernel on a copy-free view of its input:

* ``sn_moments`` / ``sw_moments``: the per-instance (IN) and per-(sample, group) (IW)
  moments, float32 (float64 for float64 inputs);
* ``sn_affine`` / ``sw_whiten``: ``y = x * scale + shift`` and ``y = M (x - centre) + shift``;
* ``sn_grad_sums`` / ``sw_grad_sums`` and ``sn_grad_input`` / ``sw_grad_input``: the two
  passes of the fused backward;
* ``sw_newton``: Newton's inverse square root of the mixed covariances, one program per
  matrix (its backward is written out in PyTorch: :func:`newton_backward`).

The eager layers call the plain functions inside their autograd Functions (no dispatcher
overhead, one ``dx`` pass through the saved mixing graph; ``triton_switch_norm.py``). The
registered ops have fake implementations (torch.compile and export trace shapes without
running a kernel), and the moments, affine/whiten and Newton ops carry autograd formulas
built from ops, so moments -> the mixing step in PyTorch -> affine is differentiable and
traceable:
that is how the kernels run under torch.compile. That composed backward writes ``dx`` in two
passes plus their sum, where the fused eager backward writes it once.

Needs torch >= 2.4 (``torch.library.custom_op``).
"""
import functools
import math
from typing import Callable, Tuple

import torch
from torch import Tensor

from .moments import merge_moments
from .reference import inverse_sqrt_newton, stats_dtype

#: SW group sizes the kernels take (``tl.dot`` needs power-of-two sides of at least 16)
KERNEL_GROUP_SIZES = (16, 32, 64)


def _pow2(size: int) -> int:
    """The smallest power of two >= ``size`` (1 for 0)."""
    return 1 << max(0, (size - 1).bit_length())


def block_size(length: int, cap: int = 1024) -> int:
    """Power-of-two block covering ``length`` elements (at least 16, at most ``cap``)."""
    return max(16, min(cap, _pow2(length)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def accumulator(dtype: torch.dtype):
    """The Triton accumulation type for statistics of ``dtype``."""
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def as_ncl(t: Tensor) -> Tensor:
    """``t`` viewed as ``(N, C, L)`` without a copy (NCHW and channels_last both merge)."""
    return t.view(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def as_groups(t: Tensor, per_group: int) -> Tensor:
    """``t`` viewed as ``(N, G, c, L)`` with ``G * c = C``, without a copy."""
    n, c = t.shape[:2]
    return t.view(n, c // per_group, per_group, math.prod(t.shape[2:]))


def viewable(t: Tensor, view: Callable[[Tensor], Tensor] = as_ncl) -> Tensor:
    """``t`` itself when the kernels' view of it needs no copy (NCHW, channels_last), else a
    contiguous copy."""
    try:
        view(t)
        return t
    except RuntimeError:
        return t.contiguous()


def in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` viewed as ``(N, C, L)`` in the layout of ``like`` (an ``(N, C, L)`` view): a
    gradient that arrives NCHW for a channels_last input is copied once rather than read
    uncoalesced."""
    t3 = as_ncl(viewable(t))
    if all(a == b for a, b, size in zip(t3.stride(), like.stride(), like.shape) if size > 1):
        return t3
    return torch.empty_like(like).copy_(t3)


class _SNPlan:
    """Tile shape and grids of the SN kernels for an ``(N, C, L)`` view.

    A tile is BLOCK_C channels x BLOCK_L positions of one sample, about ``TILE`` elements,
    long along the contiguous axis: positions for NCHW, channels for channels_last (whose
    loads would otherwise stride by C). The reductions split L when the (sample,
    channel-block) programs alone would leave the GPU idle.
    """
    TILE = 2048
    MAX_CHANNELS = 64  # a channels_last tile still spans several positions

    def __init__(self, x3: Tensor):
        n, c, length = x3.shape
        if x3.stride(1) == 1 and length > 1:
            self.block_c = min(_pow2(c), self.MAX_CHANNELS)
            self.block_l = min(_pow2(length), max(1, self.TILE // self.block_c))
        else:
            self.block_l = min(_pow2(length), self.TILE)
            self.block_c = min(_pow2(c), max(1, self.TILE // self.block_l))
        programs = n * cdiv(c, self.block_c)
        blocks = cdiv(length, self.block_l)
        self.splits, self.chunk = split_reduction(programs, length, self.block_l, x3.device)
        self.reduce_grid = (programs, self.splits)
        self.pointwise_grid = (programs, blocks)

    def meta(self, dtype: torch.dtype) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_L=self.block_l, ACC=accumulator(dtype))


def split_reduction(programs: int, length: int, block: int,
                    device: torch.device) -> Tuple[int, int]:
    """``(splits, chunk)``: a reduction over ``length`` positions by ``programs`` programs is
    cut into ``splits`` chunks of ``chunk`` positions (a multiple of ``block``), enough to
    fill the device, none empty."""
    blocks = cdiv(length, block)
    wanted = min(blocks, max(1, cdiv(_programs_to_fill(device), programs)))
    per_split = cdiv(blocks, wanted)
    return cdiv(blocks, per_split), per_split * block


def merge_split_sums(parts: Tensor) -> Tensor:
    """Adds the per-split partial sums (dim 0) in a fixed order; no launch for one split."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


@functools.lru_cache(maxsize=None)
def _programs_to_fill(device: torch.device) -> int:
    """Programs that keep every streaming multiprocessor busy (a few per SM); on the CPU
    (the interpreter, in tests) a small number, so that the split path is exercised."""
    if device.type == 'cuda':
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _has_work(*sizes: int) -> bool:
    return math.prod(sizes) > 0


def _sw_args(per_group: int, dtype: torch.dtype, length: int) -> dict:
    return dict(C_PER=per_group, BLOCK=block_size(length, 128), ACC=accumulator(dtype),
                PRECISION='ieee')


def _groups_view(t: Tensor, group_size: int) -> Tensor:
    return as_groups(viewable(t, lambda u: as_groups(u, group_size)), group_size)


# ---------------------------------------------------------------------------------------- SN

def sn_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Population mean and variance of each (n, c) of ``(N, C, *)`` ``x``, ``(N, C)``."""
    from ..kernels.switch_norm import _moments_kernel
    x3 = as_ncl(viewable(x))
    n, c, length = x3.shape
    dtype = stats_dtype(x)
    if not _has_work(n, c, length):
        return x.new_zeros((n, c), dtype=dtype), x.new_zeros((n, c), dtype=dtype)
    plan = _SNPlan(x3)
    pivot = x.new_empty((n, c), dtype=dtype)
    means = x.new_empty((plan.splits, n, c), dtype=dtype)
    m2s = torch.empty_like(means)
    _moments_kernel[plan.reduce_grid](x3, pivot, means, m2s, c, length, n * c, plan.chunk,
                                      *x3.stride(), **plan.meta(dtype))
    if plan.splits == 1:
        mean, m2 = means[0], m2s[0]
    else:  # the splits' moments about the same pivot, merged in a fixed order
        counts = (length - plan.chunk * torch.arange(plan.splits, device=x.device)).clamp(
            max=plan.chunk).to(dtype).reshape(-1, 1, 1)
        _, mean, m2 = merge_moments(counts, means, m2s, dim=0)
    return pivot + mean, m2 / length


def _sn_moments_fake(x):
    shape = tuple(x.shape[:2])
    return x.new_empty(shape, dtype=stats_dtype(x)), x.new_empty(shape, dtype=stats_dtype(x))


def sn_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale + shift`` with ``(N, C)`` coefficients, computed in their dtype."""
    from ..kernels.switch_norm import _affine_kernel
    x3 = as_ncl(viewable(x))
    y = torch.empty_like(x)
    if _has_work(*x3.shape):
        y3 = as_ncl(y)
        plan = _SNPlan(x3)
        _affine_kernel[plan.pointwise_grid](
            x3, y3, scale.contiguous(), shift.contiguous(), x3.shape[1], x3.shape[2],
            *x3.stride(), *y3.stride(), **plan.meta(scale.dtype))
    return y


def _sn_affine_fake(x, scale, shift):
    return torch.empty_like(x)


def sn_grad_sums(x: Tensor, dy: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``sum(dy)`` and ``sum(dy * x)`` of each (n, c), ``(N, C)`` in ``dtype``."""
    from ..kernels.switch_norm import _grad_sums_kernel
    x3 = as_ncl(viewable(x))
    dy3 = as_ncl(in_layout_of(dy, x3))
    n, c, length = x3.shape
    if not _has_work(n, c, length):
        return x.new_zeros((n, c), dtype=dtype), x.new_zeros((n, c), dtype=dtype)
    plan = _SNPlan(x3)
    sums_dy = x.new_empty((plan.splits, n, c), dtype=dtype)
    sums_dyx = torch.empty_like(sums_dy)
    _grad_sums_kernel[plan.reduce_grid](x3, dy3, sums_dy, sums_dyx, c, length, n * c,
                                        plan.chunk, *x3.stride(), *dy3.stride(),
                                        **plan.meta(dtype))
    return merge_split_sums(sums_dy), merge_split_sums(sums_dyx)


def _sn_grad_sums_fake(x, dy, dtype):
    shape = tuple(x.shape[:2])
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


def sn_grad_input(x: Tensor, dy: Tensor, scale: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``dx = dy * scale + x * a + b`` with ``(N, C)`` coefficients, in one pass."""
    from ..kernels.switch_norm import _grad_input_kernel
    x3 = as_ncl(viewable(x))
    dy3 = as_ncl(in_layout_of(dy, x3))
    dx = torch.empty_like(x)
    if _has_work(*x3.shape):
        dx3 = as_ncl(dx)
        plan = _SNPlan(x3)
        _grad_input_kernel[plan.pointwise_grid](
            x3, dy3, dx3, scale.contiguous(), a.contiguous(), b.contiguous(), x3.shape[1],
            x3.shape[2], *x3.stride(), *dy3.stride(), *dx3.stride(), **plan.meta(scale.dtype))
    return dx


def _sn_grad_input_fake(x, dy, scale, a, b):
    return torch.empty_like(x)


def sn_moments_input_coefficients(d_mean: Tensor, d_var: Tensor, mean: Tensor,
                                  length: int) -> Tuple[Tensor, Tensor]:
    """``(a, b)`` with ``dx = x * a + b`` the gradient through the IN moments:
    ``mean = sum(x) / L``, ``var = sum((x - mean)^2) / L``."""
    a = 2 * d_var / max(length, 1)
    return a, d_mean / max(length, 1) - a * mean


def _sn_moments_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _sn_moments_backward(ctx, d_mean, d_var):
    x, mean = ctx.saved_tensors
    d_mean = torch.zeros_like(mean) if d_mean is None else d_mean
    d_var = torch.zeros_like(mean) if d_var is None else d_var
    a, b = sn_moments_input_coefficients(d_mean, d_var, mean, math.prod(x.shape[2:]))
    return torch.ops.mmsn.sn_affine(x, a, b)


def _sn_affine_setup(ctx, inputs, output):
    x, scale, shift = inputs
    ctx.save_for_backward(x, scale)


def _sn_affine_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx = d_scale = d_shift = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.mmsn.sn_affine(dy, scale, torch.zeros_like(scale))
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        d_shift, d_scale = torch.ops.mmsn.sn_grad_sums(x, dy, scale.dtype)
    return dx, d_scale, d_shift


# ---------------------------------------------------------------------------------------- SW

def sw_moments(x: Tensor, group_size: int) -> Tuple[Tensor, Tensor]:
    """IW mean ``(N, G, c)`` and population covariance ``(N, G, c, c)`` of each sample's
    groups of ``group_size`` contiguous channels."""
    from ..kernels.switch_whiten import _group_moments_kernel
    x4 = _groups_view(x, group_size)
    n, groups, c, length = x4.shape
    dtype = stats_dtype(x)
    if not _has_work(n, groups, length):
        return (x.new_zeros((n, groups, c), dtype=dtype),
                x.new_zeros((n, groups, c, c), dtype=dtype))
    args = _sw_args(c, dtype, length)
    splits, chunk = split_reduction(n * groups, length, args['BLOCK'], x.device)
    pivot = x.new_empty((n, groups, c), dtype=dtype)
    totals = x.new_empty((splits, n, groups, c), dtype=dtype)
    grams = x.new_empty((splits, n, groups, c, c), dtype=dtype)
    _group_moments_kernel[(n * groups, splits)](x4, pivot, totals, grams, groups, length,
                                                n * groups, chunk, *x4.stride(), **args)
    # sums of x - pivot (the first column): no cancellation for large means
    mean = merge_split_sums(totals) / length
    cov = merge_split_sums(grams) / length - mean[..., :, None] * mean[..., None, :]
    return pivot + mean, cov


def _sw_moments_fake(x, group_size):
    n, groups = x.shape[0], x.shape[1] // group_size
    dtype = stats_dtype(x)
    return (x.new_empty((n, groups, group_size), dtype=dtype),
            x.new_empty((n, groups, group_size, group_size), dtype=dtype))


def sw_whiten(x: Tensor, matrix: Tensor, centre: Tensor, shift: Tensor,
              group_size: int) -> Tensor:
    """``y = matrix @ (x - centre) + shift`` on each (n, group): ``matrix`` ``(N, G, c, c)``,
    ``centre`` and ``shift`` ``(N, G, c)``, computed in their dtype."""
    from ..kernels.switch_whiten import _whiten_kernel
    x4 = _groups_view(x, group_size)
    y = torch.empty_like(x)
    n, groups, c, length = x4.shape
    if _has_work(n, groups, length):
        y4 = as_groups(y, group_size)
        args = _sw_args(c, matrix.dtype, length)
        _whiten_kernel[(n * groups, cdiv(length, args['BLOCK']))](
            x4, y4, matrix.contiguous(), centre.contiguous(), shift.contiguous(), groups,
            length, *x4.stride(), *y4.stride(), **args)
    return y


def _sw_whiten_fake(x, matrix, centre, shift, group_size):
    return torch.empty_like(x)


def sw_grad_sums(x: Tensor, dy: Tensor, centre: Tensor,
                 group_size: int) -> Tuple[Tensor, Tensor]:
    """``sum(dy (x - centre)^T)`` ``(N, G, c, c)`` and ``sum(dy)`` ``(N, G, c)``, in the dtype
    of ``centre``."""
    from ..kernels.switch_whiten import _whiten_grad_sums_kernel
    x4, dy4 = _groups_view(x, group_size), _groups_view(dy, group_size)
    n, groups, c, length = x4.shape
    if not _has_work(n, groups, length):
        return (x.new_zeros((n, groups, c, c), dtype=centre.dtype),
                x.new_zeros((n, groups, c), dtype=centre.dtype))
    args = _sw_args(c, centre.dtype, length)
    splits, chunk = split_reduction(n * groups, length, args['BLOCK'], x.device)
    outers = x.new_empty((splits, n, groups, c, c), dtype=centre.dtype)
    sums_dy = x.new_empty((splits, n, groups, c), dtype=centre.dtype)
    _whiten_grad_sums_kernel[(n * groups, splits)](
        x4, dy4, centre.contiguous(), outers, sums_dy, groups, length, n * groups, chunk,
        *x4.stride(), *dy4.stride(), **args)
    return merge_split_sums(outers), merge_split_sums(sums_dy)


def _sw_grad_sums_fake(x, dy, centre, group_size):
    n, groups = x.shape[0], x.shape[1] // group_size
    return (x.new_empty((n, groups, group_size, group_size), dtype=centre.dtype),
            x.new_empty((n, groups, group_size), dtype=centre.dtype))


def sw_grad_input(x: Tensor, dy: Tensor, matrix_t: Tensor, moment: Tensor, mean: Tensor,
                  vector: Tensor, group_size: int) -> Tensor:
    """``dx = matrix_t @ dy + moment @ (x - mean) + vector`` on each (n, group), one pass."""
    from ..kernels.switch_whiten import _whiten_grad_input_kernel
    x4, dy4 = _groups_view(x, group_size), _groups_view(dy, group_size)
    dx = torch.empty_like(x)
    n, groups, c, length = x4.shape
    if _has_work(n, groups, length):
        dx4 = as_groups(dx, group_size)
        args = _sw_args(c, matrix_t.dtype, length)
        _whiten_grad_input_kernel[(n * groups, cdiv(length, args['BLOCK']))](
            x4, dy4, dx4, matrix_t.contiguous(), moment.contiguous(), mean.contiguous(),
            vector.contiguous(), groups, length, *x4.stride(), *dy4.stride(), *dx4.stride(),
            **args)
    return dx


def _sw_grad_input_fake(x, dy, matrix_t, moment, mean, vector, group_size):
    return torch.empty_like(x)


def sw_moments_input_coefficients(d_mean: Tensor, d_cov: Tensor,
                                  length: int) -> Tuple[Tensor, Tensor]:
    """``(A, v)`` with ``dx = A (x - mean) + v`` the gradient through the IW moments:
    ``mean = sum(x) / L``, ``cov = sum((x - mean)(x - mean)^T) / L``."""
    return (d_cov + d_cov.transpose(-1, -2)) / max(length, 1), d_mean / max(length, 1)


def _sw_moments_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])
    ctx.group_size = inputs[1]


def _sw_moments_backward(ctx, d_mean, d_cov):
    x, mean = ctx.saved_tensors
    c = ctx.group_size
    d_mean = torch.zeros_like(mean) if d_mean is None else d_mean
    d_cov = mean.new_zeros(mean.shape + (c,)) if d_cov is None else d_cov
    moment, vector = sw_moments_input_coefficients(d_mean, d_cov, math.prod(x.shape[2:]))
    return torch.ops.mmsn.sw_whiten(x, moment, mean, vector, c), None


def _sw_whiten_setup(ctx, inputs, output):
    x, matrix, centre, shift, group_size = inputs
    ctx.save_for_backward(x, matrix, centre)
    ctx.group_size = group_size


def _sw_whiten_backward(ctx, dy):
    x, matrix, centre = ctx.saved_tensors
    dx = d_matrix = d_centre = d_shift = None
    if ctx.needs_input_grad[0]:
        zeros = torch.zeros_like(centre)
        dx = torch.ops.mmsn.sw_whiten(dy, matrix.transpose(-1, -2), zeros, zeros,
                                      ctx.group_size)
    if any(ctx.needs_input_grad[1:4]):
        d_matrix, d_shift = torch.ops.mmsn.sw_grad_sums(x, dy, centre, ctx.group_size)
        d_centre = -torch.matmul(matrix.transpose(-1, -2), d_shift[..., None])[..., 0]
    return dx, d_matrix, d_centre, d_shift, None


def sw_newton(cov: Tensor, iterations: int) -> Tensor:
    """``cov^{-1/2}`` of each float32 ``(..., c, c)`` matrix by Newton's iteration (SW Eqn. 7),
    one program per matrix; equal to :func:`~mmsn.ops.reference.inverse_sqrt_newton`."""
    from ..kernels.switch_whiten import _newton_inverse_sqrt_kernel
    c = cov.shape[-1]
    cov = cov.contiguous()
    out = torch.empty_like(cov)
    count = cov.numel() // (c * c) if c else 0
    if count:
        _newton_inverse_sqrt_kernel[(count,)](cov, out, C_PER=c, ITERATIONS=iterations,
                                              PRECISION='ieee')
    return out


def _sw_newton_fake(cov, iterations):
    return torch.empty_like(cov, memory_format=torch.contiguous_format)


def newton_backward(cov: Tensor, iterations: int, grad: Tensor) -> Tensor:
    """The gradient through :func:`~mmsn.ops.reference.inverse_sqrt_newton` with respect to
    ``cov``, written out (traceable, so the registered op has it under torch.compile too).

    Forward: ``S = cov / tr``, ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 S``, ``out = P_T / sqrt(tr)``.
    The iterates are recomputed (c x c matrices: cheap), then walked back.
    """
    t = lambda m: m.transpose(-1, -2)  # noqa: E731
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    normalised = cov / trace
    iterates = [eye]
    for _ in range(iterations):
        p = iterates[-1]
        iterates.append(1.5 * p - 0.5 * (p @ p @ p) @ normalised)
    grad_p = grad / trace.sqrt()
    grad_trace = -0.5 * (grad * iterates[-1]).sum((-1, -2), keepdim=True) / trace ** 1.5
    grad_normalised = torch.zeros_like(cov)
    for p in reversed(iterates[:-1]):
        p2 = p @ p
        grad_cube = -0.5 * grad_p                          # d loss / d (P^3 S)
        grad_normalised = grad_normalised + t(p2 @ p) @ grad_cube
        m = grad_cube @ t(normalised)                      # d loss / d P^3
        grad_p = 1.5 * grad_p + m @ t(p2) + t(p) @ m @ t(p) + t(p2) @ m
    grad_trace = grad_trace - (grad_normalised * cov).sum((-1, -2), keepdim=True) / trace ** 2
    return grad_normalised / trace + grad_trace * eye


def _sw_newton_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.iterations = inputs[1]


def _sw_newton_backward(ctx, grad):
    cov, = ctx.saved_tensors
    return newton_backward(cov, ctx.iterations, grad), None


def newton_inverse_sqrt(cov: Tensor, iterations: int) -> Tensor:
    """The kernels' Newton step: the ``sw_newton`` op for float32 matrices of a kernel group
    size, the reference otherwise (float64 runs, other sizes)."""
    if cov.dtype == torch.float32 and cov.shape[-1] in KERNEL_GROUP_SIZES:
        return torch.ops.mmsn.sw_newton(cov, iterations)
    return inverse_sqrt_newton(cov, iterations)


def _register() -> None:
    """Registers the launches above as ``torch.ops.mmsn.*`` with fake implementations, and
    the autograd formulas of the differentiable ones."""
    fakes = {sn_moments: _sn_moments_fake, sn_affine: _sn_affine_fake,
             sn_grad_sums: _sn_grad_sums_fake, sn_grad_input: _sn_grad_input_fake,
             sw_moments: _sw_moments_fake, sw_whiten: _sw_whiten_fake,
             sw_grad_sums: _sw_grad_sums_fake, sw_grad_input: _sw_grad_input_fake,
             sw_newton: _sw_newton_fake}
    autograd = {sn_moments: (_sn_moments_backward, _sn_moments_setup),
                sn_affine: (_sn_affine_backward, _sn_affine_setup),
                sw_moments: (_sw_moments_backward, _sw_moments_setup),
                sw_whiten: (_sw_whiten_backward, _sw_whiten_setup),
                sw_newton: (_sw_newton_backward, _sw_newton_setup)}
    for launch, fake in fakes.items():
        op = torch.library.custom_op(f'mmsn::{launch.__name__}', launch, mutates_args=())
        op.register_fake(fake)
        if launch in autograd:
            backward, setup = autograd[launch]
            op.register_autograd(backward, setup_context=setup)


_register()
