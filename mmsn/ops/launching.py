"""What every Triton launch of mmsn shares: :func:`launch` (the one place a kernel is
launched, with ptxas's register cap), :func:`observe_launches` (the ahead-of-time check and
the launch counts see exactly what runs through it), grids, tiles, views and the split of a
reduction over the GPU, and the choice of gradient that both ops' backwards make
(:func:`exact_gradients`). The launches themselves are planned by each op's host module:
``triton_switch_norm.py`` (SN) and ``triton_switch_whiten.py`` (SW).
"""
import contextlib
import functools
import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

#: ``observer(kernel, grid, arguments) -> run`` while :func:`observe_launches` is active
_observer: Optional[Callable[..., bool]] = None
#: streaming multiprocessors to plan for instead of the device's (ahead-of-time checks)
_planned_multiprocessors: Optional[int] = None


#: registers per thread: the streaming passes (they read x) and the mixing kernels (they
#: read the moments, see ``mixing_jit`` in ``mmsn/kernels/switch_norm_mixing.py``); why these
#: numbers: ``mmsn/tools/compile_check.py``
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
    imposed (``mmsn.tools.compile_check`` fails on either), and the tiles and warps keep to them.
    """
    return min(MIXING_REGISTERS, BLOCK_REGISTERS // (32 * num_warps))


def launch(kernel, grid: Tuple[int, ...], *, num_warps: int = 4, **arguments) -> None:
    """Launches ``kernel[grid](**arguments)`` on ``num_warps`` warps with ptxas's register
    cap (:func:`register_cap`). Every argument goes by its name in the kernel's signature,
    and every kernel of mmsn goes through here, so that :func:`observe_launches` sees exactly
    what the ops launch."""
    arguments.update(num_warps=num_warps, maxnreg=register_cap(num_warps))
    if _observer is not None and not _observer(kernel, grid, arguments):
        return
    kernel[grid](**arguments)


@contextlib.contextmanager
def observe_launches(observer: Callable[..., bool], multiprocessors: Optional[int] = None):
    """Calls ``observer(kernel, grid, arguments)`` (the launch's arguments by name, its
    options ``num_warps`` and ``maxnreg`` among them) before every launch inside; a launch
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


def next_pow2(size: int) -> int:
    """The smallest power of two >= ``size`` (1 for 0)."""
    return 1 << max(0, (size - 1).bit_length())


def block_size(length: int, cap: int = 1024) -> int:
    """Power-of-two block covering ``length`` elements (at least 16, at most ``cap``)."""
    return max(16, min(cap, next_pow2(length)))


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


def as_groups(t: Tensor, num_pergroup: int) -> Tensor:
    """``t`` viewed as ``(N, G, c, L)`` with ``c = num_pergroup`` and ``G c = C``, without a
    copy."""
    n, c = t.shape[:2]
    return t.view(n, c // num_pergroup, num_pergroup, math.prod(t.shape[2:]))


#: the axes of the kernels' stride arguments, by the rank of the view they read
_STRIDE_AXES = {3: 'ncl', 4: 'ngcl'}


def strides(t: Tensor, prefix: str = '') -> Dict[str, int]:
    """``t``'s strides by the kernels' argument names: ``{prefix}stride_n``, ``_c``, ``_l``
    of an ``(N, C, L)`` view; ``_n``, ``_g``, ``_c``, ``_l`` of an ``(N, G, c, L)`` one."""
    return {f'{prefix}stride_{axis}': stride
            for axis, stride in zip(_STRIDE_AXES[t.dim()], t.stride())}


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


def has_work(*sizes: int) -> bool:
    return math.prod(sizes) > 0


def no_running_statistics(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The custom ops' running-statistics outputs for a layer without buffers: empty tensors
    (an op's outputs cannot be None)."""
    return (x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32),
            x.new_empty(0, dtype=torch.long))


def exact_gradients(ctx, dy: Tensor, saved_type, reference: Callable[..., Tensor],
                    kernels: Callable[..., Tuple[Optional[Tensor], ...]]
                    ) -> Tuple[Optional[Tensor], ...]:
    """The gradients of an op's inputs ``(x, mean_weight, var_weight, weight, bias)`` that
    its forward saved first in ``ctx`` (then the fields of ``saved_type``, and its options
    as ``ctx.options``); None for those that need none.

    With grad mode on (``create_graph=True``: gradient penalties, double backward) the
    kernels' closed form, which is not itself differentiable, would give wrong second-order
    gradients: ``reference(inputs, saved, options)`` recomputes the layer (its running
    statistics untouched) and is differentiated instead. Otherwise
    ``kernels(dy, inputs, saved, options, input_grad)`` gives them in one backward.
    """
    tensors = ctx.saved_tensors  # (read once: activation checkpointing unpacks them once)
    inputs, saved = tensors[:5], saved_type(*tensors[5:])
    needs = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():
        with torch.enable_grad():
            y = reference(inputs, saved, ctx.options)
            wanted = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
        return tuple(next(grads) if need else None for need in needs)
    grads = kernels(dy, inputs, saved, ctx.options, needs[0])
    return tuple(g if need else None for g, need in zip(grads, needs))
