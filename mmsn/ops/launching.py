"""The Triton kernel launches. Every launch goes through :func:`launch`, so
:func:`observe_launches` (the ahead-of-time check, launch counts) sees exactly what runs.

* SN: :func:`sn_forward` (moments pass, mixing kernel, normalize pass) and
  :func:`sn_backward` (sums pass, the mixing step's vector-Jacobian product, ``dx`` pass),
  called by the eager autograd Function and, as the ``mmsn::sn_forward`` /
  ``mmsn::sn_backward`` custom ops, under torch.compile (``triton_switch_norm.py``).
* SW: :func:`sw_forward` (moments pass, BW moments, mixing kernel with Newton's iteration,
  whitening pass) and :func:`sw_backward` (sums pass, three small kernels for the mixing
  step's vector-Jacobian product, ``dx`` pass), the same way (``triton_switch_whiten.py``).

Needs torch >= 2.4 (``torch.library.custom_op``).
"""
import contextlib
import functools
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .distributed import sync_world_size
from .reference import stats_dtype

#: SW group sizes the kernels take (``tl.dot`` needs power-of-two sides of at least 16)
KERNEL_GROUP_SIZES = (16, 32, 64)


def sw_kernels_refuse(num_pergroup: int, method: str, dtype: torch.dtype) -> Optional[str]:
    """Why the SW kernels do not take a layer call (None when they do), naming the argument.

    Float64 at 64 channels per group is left to the reference: Newton's backward on 64 x 64
    double iterates spills 260-940 bytes a thread at any warp count on sm_80 and sm_90
    (``mmsn.ops.aot``), and float64 on a GPU is for checking, not for speed.
    """
    if num_pergroup not in KERNEL_GROUP_SIZES:
        return (f'num_pergroup: the kernels take {KERNEL_GROUP_SIZES} channels per group, got '
                f'{num_pergroup}')
    if method != 'newton':
        return f"method: the kernels implement 'newton', got {method!r}"
    if dtype == torch.float64 and num_pergroup == 64:
        return ('input: the kernels take float64 at 16 or 32 channels per group, got float64 '
                'at 64 (the reference serves it)')
    return None


#: ``observer(kernel, grid, args, options) -> run`` while :func:`observe_launches` is active
_observer: Optional[Callable[..., bool]] = None
#: streaming multiprocessors to plan for instead of the device's (ahead-of-time checks)
_planned_multiprocessors: Optional[int] = None


#: registers per thread: the streaming passes (they read x) and the mixing kernels (they
#: read the moments, see ``mixing_jit`` in ``mmsn/kernels/switch_norm_mixing.py``); why these
#: numbers: ``mmsn/ops/aot.py``
STREAMING_REGISTERS = 128
MIXING_REGISTERS = 255
#: registers of one block (every architecture since sm_50)
BLOCK_REGISTERS = 65536


def register_budget(kernel) -> int:
    """The registers per thread ``kernel`` may use."""
    return MIXING_REGISTERS if getattr(kernel, 'mixing', False) else STREAMING_REGISTERS


def register_cap(num_warps: int) -> int:
    """ptxas's register cap (``maxnreg``) for a launch of ``num_warps`` warps: what one block
    can have (255 up to 8 warps, 128 at 16, 64 at 32).

    Set on every launch because ptxas, left to itself, trades registers for occupancy and
    spilled a few bytes a thread for it (8-48 in SN's mixing backward, SW's batch backward
    and the float16 sums pass on sm_80) where the block had registers to spare. With the cap
    a spill is real register pressure; the register budgets above are then checked, not
    imposed (``mmsn.ops.aot`` fails on either), and the tiles and warps keep to them.
    """
    return min(MIXING_REGISTERS, BLOCK_REGISTERS // (32 * num_warps))


def launch(kernel, grid: Tuple[int, ...], *args, num_warps: int = 4, **constexprs) -> None:
    """Launches ``kernel[grid](*args, num_warps=..., **constexprs)`` with ptxas's register
    cap (:func:`register_cap`): every kernel of mmsn goes through here, so that
    :func:`observe_launches` sees exactly what the ops launch."""
    options = dict(num_warps=num_warps, maxnreg=register_cap(num_warps))
    if _observer is not None and not _observer(kernel, grid, args, dict(constexprs, **options)):
        return
    kernel[grid](*args, **options, **constexprs)


@contextlib.contextmanager
def observe_launches(observer: Callable[..., bool], multiprocessors: Optional[int] = None):
    """Calls ``observer(kernel, grid, args, options)`` before every launch inside; a launch
    runs only if it returns True (False: plan and count without running anything).

    Args:
        observer (callable): see above.
        multiprocessors (int, optional): plan the split reductions for a GPU with this many
            SMs (e.g. 132 for an H100) instead of the tensors' device.
    """
    global _observer, _planned_multiprocessors
    saved = _observer, _planned_multiprocessors
    _observer, _planned_multiprocessors = observer, multiprocessors
    try:
        yield
    finally:
        _observer, _planned_multiprocessors = saved


def _pow2(size: int) -> int:
    """The smallest power of two >= ``size`` (1 for 0)."""
    return 1 << max(0, (size - 1).bit_length())


def block_size(length: int, cap: int = 1024) -> int:
    """Power-of-two block covering ``length`` elements (at least 16, at most ``cap``)."""
    return max(16, min(cap, _pow2(length)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: the most programs a grid may have: CUDA takes 2**31 - 1 on axis 0, and Triton's launcher
#: multiplies the three axes in a C ``int`` (skipping the launch when that is not positive)
MAX_PROGRAMS = 2 ** 31 - 1
#: maps of at least this many positions take the streaming kernels' 64-bit positions: below
#: it, a position past the map by a tile stays under 2**31 in the 32-bit ones (cheaper per
#: element)
LARGE_MAP = 2 ** 30


def flat_grid(programs: int, blocks: int) -> Tuple[int]:
    """The grid of a streaming kernel's ``programs x blocks`` programs, numbered flat on
    axis 0 (``_grid_position`` in ``mmsn/kernels/switch_norm.py``). Axes 1 and 2 stop at
    65535, which the blocks of L of a channels_last 1024 x 2048 map or a 128^3 volume pass;
    axis 0 holds every tensor that fits in memory (tiles of at least 1024 elements: 2**41
    elements before the limit).

    Raises:
        ValueError: past ``MAX_PROGRAMS``.
    """
    total = programs * blocks
    if total > MAX_PROGRAMS:
        raise ValueError(f'input: {total} programs, over the {MAX_PROGRAMS} a grid can number')
    return (total,)


def positions(length: int):
    """The integer type of the streaming kernels' positions for a map of ``length``."""
    import triton.language as tl
    return tl.int64 if length >= LARGE_MAP else tl.int32


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
    channel-block) programs alone would leave the GPU idle. Each pass's programs, times its
    blocks of L or splits, make one :func:`flat_grid`.
    """
    TILE = 2048
    MAX_CHANNELS = 64  # a channels_last tile still spans several positions

    def __init__(self, x3: Tensor):
        n, c, length = x3.shape
        self.channels_last = x3.stride(1) == 1 and length > 1
        if self.channels_last:
            self.block_c = min(_pow2(c), self.MAX_CHANNELS)
            self.block_l = min(_pow2(length), max(1, self.TILE // self.block_c))
        else:
            self.block_l = min(_pow2(length), self.TILE)
            self.block_c = min(_pow2(c), max(1, self.TILE // self.block_l))
        self.programs = n * cdiv(c, self.block_c)
        blocks = cdiv(length, self.block_l)
        self.splits, self.chunk = split_reduction(self.programs, length, self.block_l,
                                                  x3.device)
        self.reduce_grid = flat_grid(self.programs, self.splits)
        self.pointwise_grid = flat_grid(self.programs, blocks)
        self.positions = positions(length)

    def meta(self, dtype: torch.dtype, pointwise: bool = False) -> dict:
        # 8 elements of a tile per thread: at 16 (a 2048 tile on 4 warps) the reductions
        # needed 148-168 registers (tests/test_kernel_resources.py), and float64's moments
        # pass needed 149-159 at 8 (so 4 for float64: under 100). The pointwise passes over
        # several channels of a small NCHW map take 4: at 8, sm_80's fp16 dx pass kept an
        # 8-byte stack frame (and 150 registers at 16).
        several_channels = self.block_c > 1 and not self.channels_last
        per_thread = 128 if (pointwise and several_channels) or dtype == torch.float64 else 256
        warps = max(1, min(16, self.block_c * self.block_l // per_thread))
        return dict(BLOCK_C=self.block_c, BLOCK_L=self.block_l, ACC=accumulator(dtype),
                    POSITIONS=self.positions, num_warps=warps)


def split_reduction(programs: int, length: int, block: int,
                    device: torch.device) -> Tuple[int, int]:
    """``(splits, chunk)``: a reduction over ``length`` positions by ``programs`` programs is
    cut into ``splits`` chunks of ``chunk`` positions (a multiple of ``block``), enough to
    fill the device, none empty."""
    blocks = cdiv(length, block)
    wanted = min(blocks, max(1, cdiv(_programs_to_fill(device), programs)))
    per_split = cdiv(blocks, wanted)
    return cdiv(blocks, per_split), per_split * block


def _programs_to_fill(device: torch.device) -> int:
    """Programs that keep every streaming multiprocessor busy (a few per SM); on the CPU
    (the interpreter, in tests) a small number, so that the split path is exercised."""
    if _planned_multiprocessors is not None:
        return 4 * _planned_multiprocessors
    return _device_programs_to_fill(device)


@functools.lru_cache(maxsize=None)
def _device_programs_to_fill(device: torch.device) -> int:
    if device.type == 'cuda':
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _has_work(*sizes: int) -> bool:
    return math.prod(sizes) > 0


#: (positions per tile, warps) of each SW pass by channels per group. The IEEE-float32
#: ``tl.dot`` runs on CUDA cores and keeps its operand tiles and the c x c matrices in
#: registers, so the tile shrinks as c grows: these fit 128 registers per thread without
#: spills on sm_80 and sm_90 in every dtype and layout (``python -m mmsn.ops.aot``; with
#: 128-position tiles at 4 warps, 32 and 64 per group spilled up to 18 kB per thread; the
#: 16-per-group moments pass that writes the finished moments kept an 8-byte stack frame
#: on sm_90 at 4 warps). At 64 per group the whitening pass and the sums pass take 16
#: warps: at 8 they needed 144 and 136-148 registers on sm_80 (the c x c matrix, and the
#: dot's operand strips, spread over half the threads); the sums pass cannot take 32 (a
#: block of 1024 threads leaves 64 registers each: it spilled on sm_90). At 32 per group
#: the moments and sums passes take 16 too (at 4 and 8: 142-254 and 148 registers), and at
#: 16 per group the sums pass 8 (130 at 4): under the cap of ``register_cap`` ptxas uses
#: what a block allows, so the warps, not ptxas, keep these passes within their budget.
_SW_PLANS = {
    'moments': {16: (128, 8), 32: (32, 16), 64: (32, 16)},
    'whiten': {16: (128, 4), 32: (64, 4), 64: (32, 16)},
    'grad_sums': {16: (32, 8), 32: (32, 16), 64: (16, 16)},
    'grad_input': {16: (128, 4), 32: (32, 4), 64: (16, 8)},
}
#: Warps of SW's small kernels (one program per group or per instance: the batch moments,
#: the forward mixing step with Newton's iteration, the backward's three kernels) by
#: channels per group; at 64 Newton's products come from scratch memory (``_product`` in
#: ``switch_whiten_mixing.py``). The backward (Newton's backward) takes 8 at every size: at
#: 4 (16 per group) it kept an 8-byte stack frame on sm_90, at 16 (64 per group, 128
#: registers a thread) 16 bytes on sm_80; at 8 it uses 224-255 registers and no stack.
_SW_MIX_WARPS = {
    'batch': {16: 4, 32: 8, 64: 16},
    'forward': {16: 4, 32: 8, 64: 32},
    'backward': {16: 8, 32: 8, 64: 8},
    'batch_backward': {16: 4, 32: 8, 64: 16},
    'coefficients': {16: 4, 32: 8, 64: 16},
}


#: Float64 where its warps differ: Newton's backward at 32 per group kept an 8-byte stack
#: frame on sm_90 at 8 and 16 warps (the most registers a block allows), none at 32.
_SW_MIX_WARPS_FLOAT64 = {('backward', 32): 32}


def _sw_mixing_options(kernel: str, per_group: int, dtype: torch.dtype) -> dict:
    """``num_warps`` of one of SW's small kernels (registers: :func:`register_cap`)."""
    warps = _SW_MIX_WARPS[kernel][per_group]
    if dtype == torch.float64:
        warps = _SW_MIX_WARPS_FLOAT64.get((kernel, per_group), warps)
    return dict(num_warps=warps)


#: Group sizes whose mixing kernel runs Newton's iteration forward in registers. At 64 the
#: 64 x 64 iterates and products spill kilobytes at any warp count: there the forward goes
#: through scratch memory as the backward always does (``_inverse_sqrt_scratch``).
_NEWTON_IN_REGISTERS = (16, 32)


def batch_moments_views(batch: Tensor, groups: int, c: int) -> Tuple[Tensor, Tensor]:
    """The BW mean ``(G c,)`` and covariance ``(G c c,)`` parts of the ``batch`` buffer
    ``[mean, cov, T]`` that :func:`sw_forward` fills and saves."""
    return batch[:groups * c], batch[groups * c:-1]


def _sw_args(per_group: int, dtype: torch.dtype, length: int, kind: str) -> dict:
    tile, warps = _SW_PLANS[kind][per_group]
    return dict(C_PER=per_group, BLOCK=block_size(length, tile), ACC=accumulator(dtype),
                PRECISION='ieee', POSITIONS=positions(length), num_warps=warps)


def _groups_view(t: Tensor, group_size: int) -> Tensor:
    return as_groups(viewable(t, lambda u: as_groups(u, group_size)), group_size)


# ---------------------------------------------------------------------------------------- SN

def _mixing_plan(n: int, c: int, backward: bool = False) -> dict:
    """Tile and warps of the one-program mixing kernels: about 1024 numbers a tile, few
    enough that the backward's dozen live tiles stay in registers; 2 numbers per thread
    forward, 8 backward (registers: :func:`register_cap`). Checked ahead of time by
    tests/test_kernel_resources.py."""
    block_n = min(_pow2(max(n, 1)), 16)
    block_c = min(_pow2(c), max(16, 1024 // block_n))
    if backward:
        warps = max(1, min(8, block_n * block_c // 128))
    else:
        warps = max(1, min(16, block_n * block_c // 64))
    return dict(BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps)


def sn_forward(x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], running: Optional[Tuple[Tensor, Tensor, Tensor]],
               use_batch_stats: bool, momentum: Optional[float], eps: float,
               logits: bool = True, process_group: Optional[object] = None,
               sync: bool = False,
               updated: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tuple[Tensor, ...]:
    """SN forward on the kernels: moments pass, mixing kernel, normalize pass (synchronized:
    a second mixing stage around one all-gather of the packed batch moments).

    Args:
        x (Tensor): ``(N, C, *)`` input that :func:`as_ncl` views without a copy.
        mean_weight, var_weight (Tensor): ``(K,)`` ratio logits (``logits``) or ratios.
        weight, bias (Tensor, optional): ``(C,)`` affine parameters.
        running (tuple, optional): ``(running_mean, running_var, num_batches_tracked)``.
        use_batch_stats (bool): BN from the batch (and update ``running``) or from it.
        updated (tuple, optional): where the updated running statistics go; defaults to
            ``running`` itself (in place).

    Returns:
        tuple: ``y`` and what the backward needs: ``mean_in``, ``var_in`` ``(N, C)``, the
        pooled ``stats`` (see ``mmsn/kernels/switch_norm_mixing.py``) and ``scale``.
    """
    from ..kernels.switch_norm import _affine_kernel, _moments_kernel
    from ..kernels.switch_norm_mixing import _mix_forward_kernel
    x_in, x = x, as_ncl(x)
    n, c, length = x.shape
    k = mean_weight.shape[0]
    dtype = stats_dtype(x)
    meta = dict(ACC=accumulator(dtype))
    stats = x.new_empty(2 * n + 2 * c + 1, dtype=dtype)
    mean_in, var_in, scale = (x.new_empty((n, c), dtype=dtype) for _ in range(3))
    pivot, shift = x.new_empty((2, n, c), dtype=dtype).unbind()
    splits, chunk = 0, 1
    partial_means = partial_m2s = stats  # (no moments pass: nothing is read)
    if _has_work(n, c, length):
        plan = _SNPlan(x)
        splits, chunk = plan.splits, plan.chunk
        partial_means, partial_m2s = x.new_empty((2, splits, n, c), dtype=dtype).unbind()
        launch(_moments_kernel, plan.reduce_grid, x, pivot, partial_means, partial_m2s, c,
               length, n * c, plan.programs, plan.chunk, *x.stride(), **plan.meta(dtype))
    update = use_batch_stats and running is not None and k == 3
    running = running if running is not None else (stats, stats, stats)
    updated = updated if updated is not None else running
    world = sync_world_size(process_group) if sync else 1
    # (unused pointers get any tensor: stats)
    args = dict(pivot_ptr=pivot, part_mean_ptr=partial_means, part_m2_ptr=partial_m2s,
                mean_logit_ptr=mean_weight, var_logit_ptr=var_weight,
                weight_ptr=stats if weight is None else weight,
                bias_ptr=stats if bias is None else bias, running_mean_ptr=running[0],
                running_var_ptr=running[1], new_mean_ptr=updated[0], new_var_ptr=updated[1],
                tracked_ptr=running[2], new_tracked_ptr=updated[2], parts_ptr=stats,
                mean_in_ptr=mean_in, var_in_ptr=var_in, stats_ptr=stats, scale_ptr=scale,
                shift_ptr=shift, N=n, C=c, L=length, S=splits, chunk=chunk, R=world,
                momentum=0.0 if momentum is None else momentum, eps=eps,
                K=k, LOGITS=logits, AFFINE=weight is not None, BATCH=use_batch_stats,
                UPDATE=update, CUMULATIVE=momentum is None, **_mixing_plan(n, c), **meta)
    if world > 1 and use_batch_stats and k == 3:
        local = x.new_empty(1 + 2 * c, dtype=dtype)
        launch(_mix_forward_kernel, (1,), **dict(args, parts_ptr=local), STAGE=1)
        gathered = x.new_empty(world * (1 + 2 * c), dtype=dtype)  # (gloo wants it flat)
        torch.distributed.all_gather_into_tensor(gathered, local, group=process_group)
        launch(_mix_forward_kernel, (1,), **dict(args, parts_ptr=gathered), STAGE=2)
    else:
        launch(_mix_forward_kernel, (1,), **args, STAGE=0)
    y_out = torch.empty_like(x_in)
    y = as_ncl(y_out)
    if _has_work(n, c, length):
        launch(_affine_kernel, plan.pointwise_grid, x, y, scale, shift, c, length,
               plan.programs, *x.stride(), *y.stride(), **plan.meta(dtype, pointwise=True))
    return y_out, mean_in, var_in, stats, scale


def sn_backward(dy: Tensor, x: Tensor, mean_in: Tensor, var_in: Tensor, stats: Tensor,
                scale: Tensor, mean_weight: Tensor, var_weight: Tensor,
                weight: Optional[Tensor], use_batch_stats: bool, eps: float,
                logits: bool = True, process_group: Optional[object] = None,
                sync: bool = False, input_grad: bool = True) -> Tuple[Optional[Tensor], ...]:
    """SN backward on the kernels: the ``dy`` sums pass, the mixing step's vector-Jacobian
    product (synchronized: two stages around one all-reduce of the BN moments' gradients),
    the ``dx`` pass. ``dy`` and ``x`` are ``(N, C, L)`` views in the same layout.

    Returns:
        tuple: ``dx`` (None unless ``input_grad``) and the gradients of ``mean_weight``,
        ``var_weight``, ``weight`` and ``bias`` (None without affine parameters).
    """
    from ..kernels.switch_norm import _grad_input_kernel, _grad_sums_kernel
    from ..kernels.switch_norm_mixing import _mix_backward_kernel
    x_in, x = x, as_ncl(x)
    dy = in_layout_of(dy, x)
    n, c, length = x.shape
    k = mean_weight.shape[0]
    dtype = stats.dtype
    meta = dict(ACC=accumulator(dtype))
    splits = 0
    sums_dy = sums_dyc = stats  # (no sums pass: nothing is read)
    if _has_work(n, c, length):
        plan = _SNPlan(x)
        splits = plan.splits
        sums_dy, sums_dyc = x.new_empty((2, splits, n, c), dtype=dtype).unbind()
        launch(_grad_sums_kernel, plan.reduce_grid, x, dy, mean_in, sums_dy, sums_dyc, c,
               length, n * c, plan.programs, plan.chunk, *x.stride(), *dy.stride(),
               **plan.meta(dtype))
    grad_stats = x.new_empty(2 * n + 2 * c, dtype=dtype)
    d_mean_weight, d_var_weight = torch.empty_like(mean_weight), torch.empty_like(var_weight)
    affine = weight is not None
    d_weight, d_bias = (torch.empty_like(weight), torch.empty_like(weight)) if affine else \
        (None, None)
    a, b = x.new_empty((2, n, c), dtype=dtype).unbind()
    args = (sums_dy, sums_dyc, mean_in, var_in, stats, mean_weight, var_weight,
            stats if weight is None else weight, grad_stats, d_mean_weight, d_var_weight,
            stats if d_weight is None else d_weight, stats if d_bias is None else d_bias,
            a, b, n, c, length, splits, eps)
    options = dict(K=k, LOGITS=logits, AFFINE=affine, BATCH=use_batch_stats,
                   **_mixing_plan(n, c, backward=True), **meta)
    if sync and use_batch_stats and k == 3 and sync_world_size(process_group) > 1:
        launch(_mix_backward_kernel, (1,), *args, STAGE=1, **options)
        torch.distributed.all_reduce(grad_stats[2 * n:], group=process_group)
        launch(_mix_backward_kernel, (1,), *args, STAGE=2, **options)
    else:
        launch(_mix_backward_kernel, (1,), *args, STAGE=0, **options)
    dx = None
    if input_grad:
        dx = torch.empty_like(x_in)
        if _has_work(n, c, length):
            dx3 = as_ncl(dx)
            launch(_grad_input_kernel, plan.pointwise_grid, x, dy, dx3, scale, a, b, mean_in,
                   c, length, plan.programs, *x.stride(), *dy.stride(), *dx3.stride(),
                   **plan.meta(dtype, pointwise=True))
    return dx, d_mean_weight, d_var_weight, d_weight, d_bias


# ---------------------------------------------------------------------------------------- SW

def sw_moments(x: Tensor, group_size: int) -> Tuple[Tensor, Tensor]:
    """IW mean ``(N, G, c)`` and population covariance ``(N, G, c, c)`` of each sample's
    groups of ``group_size`` contiguous channels: one launch (plus the merge of the splits
    when the reduction over L is split)."""
    from ..kernels.switch_whiten import _group_moments_kernel
    x4 = _groups_view(x, group_size)
    n, groups, c, length = x4.shape
    dtype = stats_dtype(x)
    if not _has_work(n, groups, length):
        return (x.new_zeros((n, groups, c), dtype=dtype),
                x.new_zeros((n, groups, c, c), dtype=dtype))
    args = _sw_args(c, dtype, length, 'moments')
    splits, chunk = split_reduction(n * groups, length, args['BLOCK'], x.device)
    first = x.new_empty((n, groups, c), dtype=dtype)
    grid = flat_grid(n * groups, splits)
    if splits == 1:
        cov = x.new_empty((n, groups, c, c), dtype=dtype)
        launch(_group_moments_kernel, grid, x4, first, first, cov, groups, length, n * groups,
               chunk, *x4.stride(), FINAL=True, **args)
        return first, cov
    totals = x.new_empty((splits, n, groups, c), dtype=dtype)
    grams = x.new_empty((splits, n, groups, c, c), dtype=dtype)
    launch(_group_moments_kernel, grid, x4, first, totals, grams, groups, length, n * groups,
           chunk, *x4.stride(), FINAL=False, **args)
    # sums of x - pivot (the first column): no cancellation for large means
    mean = totals.sum(0) / length
    cov = grams.sum(0) / length - mean[..., :, None] * mean[..., None, :]
    return first + mean, cov


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
        args = _sw_args(c, matrix.dtype, length, 'whiten')
        grid = flat_grid(n * groups, cdiv(length, args['BLOCK']))
        launch(_whiten_kernel, grid, x4, y4, matrix, centre, shift, groups, length, n * groups,
               *x4.stride(), *y4.stride(), **args)
    return y


def sw_grad_sums(x: Tensor, dy: Tensor, centre: Tensor,
                 group_size: int) -> Tuple[Tensor, Tensor]:
    """Per split of L: ``sum(dy (x - centre)^T)`` ``(S, N, G, c, c)`` and ``sum(dy)``
    ``(S, N, G, c)``, in the dtype of ``centre`` (the mixing kernels add the splits)."""
    from ..kernels.switch_whiten import _whiten_grad_sums_kernel
    x4, dy4 = _groups_view(x, group_size), _groups_view(dy, group_size)
    n, groups, c, length = x4.shape
    if not _has_work(n, groups, length):
        return (x.new_zeros((1, n, groups, c, c), dtype=centre.dtype),
                x.new_zeros((1, n, groups, c), dtype=centre.dtype))
    args = _sw_args(c, centre.dtype, length, 'grad_sums')
    splits, chunk = split_reduction(n * groups, length, args['BLOCK'], x.device)
    outers = x.new_empty((splits, n, groups, c, c), dtype=centre.dtype)
    sums_dy = x.new_empty((splits, n, groups, c), dtype=centre.dtype)
    grid = flat_grid(n * groups, splits)
    launch(_whiten_grad_sums_kernel, grid, x4, dy4, centre, outers, sums_dy, groups, length,
           n * groups, chunk, *x4.stride(), *dy4.stride(), **args)
    return outers, sums_dy


def sw_grad_input(x: Tensor, dy: Tensor, matrix: Tensor, moment: Tensor, mean: Tensor,
                  vector: Tensor, group_size: int) -> Tensor:
    """``dx = matrix^T @ dy + moment @ (x - mean) + vector`` on each (n, group), one pass."""
    from ..kernels.switch_whiten import _whiten_grad_input_kernel
    x4, dy4 = _groups_view(x, group_size), _groups_view(dy, group_size)
    dx = torch.empty_like(x)
    n, groups, c, length = x4.shape
    if _has_work(n, groups, length):
        dx4 = as_groups(dx, group_size)
        args = _sw_args(c, matrix.dtype, length, 'grad_input')
        grid = flat_grid(n * groups, cdiv(length, args['BLOCK']))
        launch(_whiten_grad_input_kernel, grid, x4, dy4, dx4, matrix, moment, mean, vector,
               groups, length, n * groups, *x4.stride(), *dy4.stride(), *dx4.stride(),
               **args)
    return dx


def sw_forward(x: Tensor, mean_logit: Tensor, var_logit: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], running: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]],
               use_batch_stats: bool, group_size: int, sw_type: int, iterations: int,
               momentum: Optional[float], eps: float, logits: bool = True,
               process_group: Optional[object] = None, sync: bool = False,
               updated: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tuple[Tensor, ...]:
    """SW forward on the kernels: moments pass, BW moments (training; synchronized: two
    stages around one all-gather of the packed moments), mixing kernel, whitening pass.

    Args:
        x (Tensor): ``(N, C, H, W)`` input that :func:`as_groups` views without a copy.
        mean_logit, var_logit (Tensor): ``(sw_type,)`` ratio logits (``logits``) or ratios.
        weight, bias (Tensor, optional): ``(C,)`` affine parameters.
        running (tuple, optional): ``(running_mean, running_cov, num_batches_tracked)``.
        use_batch_stats (bool): BW from the batch (and update ``running``) or from it.
        updated (tuple, optional): where the updated running statistics go; defaults to
            ``running`` itself (in place).

    Returns:
        tuple: ``y`` and what the backward needs: the IW ``mean`` and ``cov``, ``batch``
        (``[mu_B, Sigma_B, T]`` as used), the affine map's ``matrix`` and ``centre``.
    """
    from ..kernels.switch_whiten_mixing import _sw_batch_kernel, _sw_mix_kernel
    n, groups, c, length = _groups_view(x, group_size).shape
    dtype = stats_dtype(x)
    mean, cov = sw_moments(x, group_size)
    batch = x.new_empty(groups * c + groups * c * c + 1, dtype=dtype)
    if not use_batch_stats and running is None:
        raise ValueError('use_batch_stats=False needs running_mean and running_cov')
    update = use_batch_stats and running is not None
    if running is None:
        running = (batch, batch, None)
    if running[2] is None:  # (the counter is read only for momentum=None, which needs one)
        running = running[:2] + (x.new_empty((), dtype=torch.long),)
    updated = updated if updated is not None else running
    common = dict(C_PER=c, ACC=accumulator(dtype))
    if use_batch_stats:
        world = sync_world_size(process_group) if sync else 1
        args = dict(mean_ptr=mean, cov_ptr=cov, parts_ptr=batch, batch_ptr=batch,
                    running_mean_ptr=running[0], running_cov_ptr=running[1],
                    new_mean_ptr=updated[0], new_cov_ptr=updated[1], tracked_ptr=running[2],
                    N=n, G=groups, L=length, R=world,
                    momentum=0.0 if momentum is None else momentum, UPDATE=update,
                    CUMULATIVE=momentum is None, **common,
                    **_sw_mixing_options('batch', c, dtype))
        if world > 1:
            local = x.new_empty(1 + groups * c + groups * c * c, dtype=dtype)
            launch(_sw_batch_kernel, (groups,), **dict(args, parts_ptr=local), STAGE=1)
            gathered = x.new_empty(world * local.numel(), dtype=dtype)  # (gloo wants it flat)
            torch.distributed.all_gather_into_tensor(gathered, local, group=process_group)
            launch(_sw_batch_kernel, (groups,), **dict(args, parts_ptr=gathered), STAGE=2)
        else:
            launch(_sw_batch_kernel, (groups,), **args, STAGE=0)
        source = batch_moments_views(batch, groups, c)
    else:
        source = running[0], running[1]
    matrix = x.new_empty((n, groups, c, c), dtype=dtype)
    centre, shift = x.new_empty((2, n, groups, c), dtype=dtype).unbind()
    scratch = c not in _NEWTON_IN_REGISTERS
    launch(_sw_mix_kernel, (max(n * groups, 1),), mean, cov, *source, batch, mean_logit,
           var_logit, batch if weight is None else weight, batch if bias is None else bias,
           running[2], updated[2], matrix, centre, shift,
           x.new_empty((n, groups, 4 if scratch else 0, c, c), dtype=dtype), n, groups, eps,
           K=sw_type, LOGITS=logits, AFFINE=weight is not None, BIAS=bias is not None,
           BATCH=use_batch_stats, UPDATE=update, SCRATCH=scratch, ITERATIONS=iterations,
           PRECISION='ieee', **common, **_sw_mixing_options('forward', c, dtype))
    y = sw_whiten(x, matrix, centre, shift, group_size)
    return y, mean, cov, batch, matrix, centre


def sw_backward(dy: Tensor, x: Tensor, mean: Tensor, cov: Tensor, batch: Tensor,
                matrix: Tensor, centre: Tensor, mean_logit: Tensor, var_logit: Tensor,
                weight: Optional[Tensor], bias: Optional[Tensor], use_batch_stats: bool,
                group_size: int, sw_type: int, iterations: int, eps: float,
                logits: bool = True, process_group: Optional[object] = None, sync: bool = False,
                input_grad: bool = True) -> Tuple[Optional[Tensor], ...]:
    """SW backward on the kernels: the ``dy`` sums pass, the mixing step's vector-Jacobian
    product (per instance, per group, per instance; synchronized layers all-reduce the BW
    moments' gradients in between), the ``dx`` pass. The saved tensors as
    :func:`sw_forward` returned them.

    Returns:
        tuple: ``dx`` (None unless ``input_grad``) and the gradients of ``mean_logit``,
        ``var_logit``, ``weight`` and ``bias`` (None for a missing parameter).
    """
    from ..kernels.switch_whiten_mixing import (PARTIALS, _sw_batch_backward_kernel,
                                                _sw_input_coefficients_kernel,
                                                _sw_mix_backward_kernel)
    dy = viewable(dy, lambda t: as_groups(t, group_size))
    n, groups, c, length = _groups_view(x, group_size).shape
    dtype = mean.dtype
    common = dict(K=sw_type, LOGITS=logits, C_PER=c, ACC=accumulator(dtype))
    outers, sums_dy = sw_grad_sums(x, dy, centre, group_size)
    splits = outers.shape[0]
    d_cov = x.new_empty((n, groups, c, c), dtype=dtype)
    d_centre, d_gamma = x.new_empty((2, n, groups, c), dtype=dtype).unbind()
    partial = x.new_empty((n, groups, PARTIALS), dtype=dtype)
    affine = weight is not None
    if n * groups:
        launch(_sw_mix_backward_kernel, (n * groups,), mean, cov,
               *batch_moments_views(batch, groups, c), mean_logit, var_logit,
               batch if weight is None else weight,
               x.new_empty((n, groups, 3 * iterations + 3, c, c), dtype=dtype), outers,
               sums_dy, d_cov, d_centre, d_gamma, partial, n, groups, splits, eps,
               AFFINE=affine, ITERATIONS=iterations, **common,
               **_sw_mixing_options('backward', c, dtype))
    grad_batch = x.new_empty(groups * c + groups * c * c, dtype=dtype)
    d_mean_logit, d_var_logit = torch.empty_like(mean_logit), torch.empty_like(var_logit)
    d_weight = torch.empty_like(weight) if affine else None
    d_bias = torch.empty_like(bias) if bias is not None else None
    launch(_sw_batch_backward_kernel, (groups,), d_cov, d_centre, d_gamma, sums_dy, partial,
           mean_logit, var_logit, grad_batch, batch if d_weight is None else d_weight,
           batch if d_bias is None else d_bias, d_mean_logit, d_var_logit, n, groups, splits,
           AFFINE=affine, BIAS=bias is not None, BATCH=use_batch_stats, **common,
           **_sw_mixing_options('batch_backward', c, dtype))
    if sync and use_batch_stats and sync_world_size(process_group) > 1:
        torch.distributed.all_reduce(grad_batch, group=process_group)
    dx = None
    if input_grad:
        moment = x.new_empty((n, groups, c, c), dtype=dtype)
        vector = x.new_empty((n, groups, c), dtype=dtype)
        if n * groups:
            launch(_sw_input_coefficients_kernel, (n * groups,), mean, batch, d_cov, d_centre,
                   partial, grad_batch, mean_logit, var_logit, moment, vector, n, groups,
                   length, BATCH=use_batch_stats, **common,
                   **_sw_mixing_options('coefficients', c, dtype))
        dx = sw_grad_input(x, dy, matrix, moment, mean, vector, group_size)
    return dx, d_mean_logit, d_var_logit, d_weight, d_bias
