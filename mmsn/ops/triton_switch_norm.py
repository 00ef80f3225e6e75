"""SN's fast path: the launches of the Triton kernels, their autograd Function and their
custom ops for torch.compile. The kernels are in ``mmsn/kernels/switch_norm.py`` (the
streaming passes over ``x``) and ``mmsn/kernels/switch_norm_mixing.py`` (the mixing step);
what every launch shares is in ``launching.py``.

Forward, three launches: the moments pass, the mixing kernel (LN, BN or running statistics,
softmax ratios, running update, affine), the normalize pass. Backward, three: the ``dy``
sums pass, the mixing step's closed-form vector-Jacobian product, the ``dx`` pass. A
synchronized layer adds one mixing stage and one collective each way: an all-gather of the
packed batch moments forward, an all-reduce of their gradients (``2C`` numbers) backward.

The same two functions, :func:`sn_forward` and :func:`sn_backward`, serve eager autograd
(:class:`_SwitchNormFunction`) and torch.compile (the ``mmsn::sn_forward`` /
``mmsn::sn_backward`` custom ops, which take no process group: synchronized layers run the
eager Function there, a graph break).

A backward run with grad mode on (``create_graph=True``: gradient penalties, double
backward) cannot use the kernels' closed form, which is not itself differentiable; it
recomputes the layer with the reference, without touching the running statistics, and
differentiates that, so second-order gradients are exact.

Needs torch >= 2.4 (``torch.library.custom_op``).
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .configs import SNConfig
from .distributed import pooled_processes
from .launching import (accumulator, as_ncl, cdiv, exact_gradients, flat_grid, has_work,
                        in_layout_of, launch, next_pow2, no_running_statistics, positions,
                        split_reduction, strides, viewable)
from .reference import stats_dtype, switch_norm_reference


class SNSaved(NamedTuple):
    """What :func:`sn_forward` keeps for :func:`sn_backward` besides the inputs."""
    mean_in: Tensor  #: ``(N, C)`` instance means
    var_in: Tensor   #: ``(N, C)`` instance variances
    stats: Tensor    #: the pooled statistics (``mmsn/kernels/switch_norm_mixing.py``)
    scale: Tensor    #: ``(N, C)`` the normalize pass's scale


class SNPlan:
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
            self.block_c = min(next_pow2(c), self.MAX_CHANNELS)
            self.block_l = min(next_pow2(length), max(1, self.TILE // self.block_c))
        else:
            self.block_l = min(next_pow2(length), self.TILE)
            self.block_c = min(next_pow2(c), max(1, self.TILE // self.block_l))
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


def _mixing_plan(n: int, c: int, backward: bool = False) -> dict:
    """Tile and warps of the one-program mixing kernels: about 1024 numbers a tile, few
    enough that the backward's dozen live tiles stay in registers; 2 numbers per thread
    forward, 8 backward (registers: :func:`~mmsn.ops.launching.register_cap`). Checked ahead
    of time by tests/test_kernel_resources.py."""
    block_n = min(next_pow2(max(n, 1)), 16)
    block_c = min(next_pow2(c), max(16, 1024 // block_n))
    if backward:
        warps = max(1, min(8, block_n * block_c // 128))
    else:
        warps = max(1, min(16, block_n * block_c // 64))
    return dict(BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps)


def sn_forward(x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], running: Optional[Tuple[Tensor, Tensor, Tensor]],
               config: SNConfig, *, use_batch_stats: bool, sync: Optional[object] = None,
               updated: Optional[Tuple[Tensor, Tensor, Tensor]] = None
               ) -> Tuple[Tensor, SNSaved]:
    """SN forward on the kernels: moments pass, mixing kernel, normalize pass (synchronized:
    a second mixing stage around one all-gather of the packed batch moments).

    Args:
        x (Tensor): ``(N, C, *)`` input that :func:`~mmsn.ops.launching.as_ncl` views
            without a copy.
        mean_weight, var_weight (Tensor): ``(K,)`` ratio logits (``config.logits``) or
            ratios.
        weight, bias (Tensor, optional): ``(C,)`` affine parameters.
        running (tuple, optional): ``(running_mean, running_var, num_batches_tracked)``.
        config (SNConfig): the layer's options.
        use_batch_stats (bool): BN from the batch (the running statistics updated) or from
            the running statistics.
        sync (ProcessGroup, optional): the group whose whole batch BN pools; None: this
            process's batch.
        updated (tuple, optional): where the updated running statistics go; defaults to
            ``running`` itself (in place).

    Returns:
        tuple: ``y`` and what the backward needs (:class:`SNSaved`).
    """
    from ..kernels.switch_norm import _affine_kernel, _moments_kernel
    from ..kernels.switch_norm_mixing import _mix_forward_kernel
    x_in, x = x, as_ncl(x)
    n, c, length = x.shape
    k = mean_weight.shape[0]
    dtype = stats_dtype(x)
    stats = x.new_empty(2 * n + 2 * c + 1, dtype=dtype)
    mean_in, var_in, scale = (x.new_empty((n, c), dtype=dtype) for _ in range(3))
    pivot, shift = x.new_empty((2, n, c), dtype=dtype).unbind()
    splits, chunk = 0, 1
    partial_means = partial_m2s = stats  # (no moments pass: nothing is read)
    if has_work(n, c, length):
        plan = SNPlan(x)
        splits, chunk = plan.splits, plan.chunk
        partial_means, partial_m2s = x.new_empty((2, splits, n, c), dtype=dtype).unbind()
        launch(_moments_kernel, plan.reduce_grid, x_ptr=x, pivot_ptr=pivot,
               mean_ptr=partial_means, m2_ptr=partial_m2s, C=c, L=length, NC=n * c,
               programs=plan.programs, chunk=plan.chunk, **strides(x), **plan.meta(dtype))
    update = use_batch_stats and running is not None and k == 3
    running = running if running is not None else (stats, stats, stats)
    updated = updated if updated is not None else running
    world = pooled_processes(sync)
    # (unused pointers get any tensor: stats)
    arguments = dict(
        pivot_ptr=pivot, part_mean_ptr=partial_means, part_m2_ptr=partial_m2s,
        mean_logit_ptr=mean_weight, var_logit_ptr=var_weight,
        weight_ptr=stats if weight is None else weight, bias_ptr=stats if bias is None else bias,
        running_mean_ptr=running[0], running_var_ptr=running[1], new_mean_ptr=updated[0],
        new_var_ptr=updated[1], tracked_ptr=running[2], new_tracked_ptr=updated[2],
        parts_ptr=stats, mean_in_ptr=mean_in, var_in_ptr=var_in, stats_ptr=stats,
        scale_ptr=scale, shift_ptr=shift, N=n, C=c, L=length, S=splits, chunk=chunk, R=world,
        momentum=0.0 if config.momentum is None else config.momentum, eps=config.eps, K=k,
        LOGITS=config.logits, AFFINE=weight is not None, BATCH=use_batch_stats, UPDATE=update,
        CUMULATIVE=config.momentum is None, ACC=accumulator(dtype),
        **_mixing_plan(n, c))
    if world > 1 and use_batch_stats and k == 3:
        local = x.new_empty(1 + 2 * c, dtype=dtype)
        launch(_mix_forward_kernel, (1,), **dict(arguments, parts_ptr=local), STAGE=1)
        gathered = x.new_empty(world * (1 + 2 * c), dtype=dtype)  # (gloo wants it flat)
        torch.distributed.all_gather_into_tensor(gathered, local, group=sync)
        launch(_mix_forward_kernel, (1,), **dict(arguments, parts_ptr=gathered), STAGE=2)
    else:
        launch(_mix_forward_kernel, (1,), **arguments, STAGE=0)
    y_out = torch.empty_like(x_in)
    y = as_ncl(y_out)
    if has_work(n, c, length):
        launch(_affine_kernel, plan.pointwise_grid, x_ptr=x, y_ptr=y, scale_ptr=scale,
               shift_ptr=shift, C=c, L=length, programs=plan.programs, **strides(x),
               **strides(y, 'y_'), **plan.meta(dtype, pointwise=True))
    return y_out, SNSaved(mean_in, var_in, stats, scale)


def sn_backward(dy: Tensor, x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                weight: Optional[Tensor], saved: SNSaved, config: SNConfig, *,
                use_batch_stats: bool, sync: Optional[object] = None,
                input_grad: bool = True) -> Tuple[Optional[Tensor], ...]:
    """SN backward on the kernels: the ``dy`` sums pass, the mixing step's vector-Jacobian
    product (synchronized: two stages around one all-reduce of the BN moments' gradients),
    the ``dx`` pass. ``x``, the parameters, ``saved`` and the options as :func:`sn_forward`
    had them.

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
    stats = saved.stats
    dtype = stats.dtype
    splits = 0
    sums_dy = sums_dyc = stats  # (no sums pass: nothing is read)
    if has_work(n, c, length):
        plan = SNPlan(x)
        splits = plan.splits
        sums_dy, sums_dyc = x.new_empty((2, splits, n, c), dtype=dtype).unbind()
        launch(_grad_sums_kernel, plan.reduce_grid, x_ptr=x, dy_ptr=dy,
               centre_ptr=saved.mean_in, sum_dy_ptr=sums_dy, sum_dyx_ptr=sums_dyc, C=c,
               L=length, NC=n * c, programs=plan.programs, chunk=plan.chunk, **strides(x),
               **strides(dy, 'dy_'), **plan.meta(dtype))
    grad_stats = x.new_empty(2 * n + 2 * c, dtype=dtype)
    d_mean_weight, d_var_weight = torch.empty_like(mean_weight), torch.empty_like(var_weight)
    affine = weight is not None
    d_weight, d_bias = (torch.empty_like(weight), torch.empty_like(weight)) if affine else \
        (None, None)
    a, b = x.new_empty((2, n, c), dtype=dtype).unbind()
    arguments = dict(
        sum_dy_ptr=sums_dy, sum_dyc_ptr=sums_dyc, mean_in_ptr=saved.mean_in,
        var_in_ptr=saved.var_in, stats_ptr=stats, mean_logit_ptr=mean_weight,
        var_logit_ptr=var_weight, weight_ptr=stats if weight is None else weight,
        grad_stats_ptr=grad_stats, d_mean_logit_ptr=d_mean_weight,
        d_var_logit_ptr=d_var_weight, d_weight_ptr=stats if d_weight is None else d_weight,
        d_bias_ptr=stats if d_bias is None else d_bias, a_ptr=a, b_ptr=b, N=n, C=c, L=length,
        S=splits, eps=config.eps, K=k, LOGITS=config.logits, AFFINE=affine,
        BATCH=use_batch_stats, ACC=accumulator(dtype), **_mixing_plan(n, c, backward=True))
    if use_batch_stats and k == 3 and pooled_processes(sync) > 1:
        launch(_mix_backward_kernel, (1,), **arguments, STAGE=1)
        torch.distributed.all_reduce(grad_stats[2 * n:], group=sync)
        launch(_mix_backward_kernel, (1,), **arguments, STAGE=2)
    else:
        launch(_mix_backward_kernel, (1,), **arguments, STAGE=0)
    dx = None
    if input_grad:
        dx = torch.empty_like(x_in)
        if has_work(n, c, length):
            dx3 = as_ncl(dx)
            launch(_grad_input_kernel, plan.pointwise_grid, x_ptr=x, dy_ptr=dy, dx_ptr=dx3,
                   scale_ptr=saved.scale, a_ptr=a, b_ptr=b, centre_ptr=saved.mean_in, C=c,
                   L=length, programs=plan.programs, **strides(x), **strides(dy, 'dy_'),
                   **strides(dx3, 'dx_'), **plan.meta(dtype, pointwise=True))
    return dx, d_mean_weight, d_var_weight, d_weight, d_bias


# ------------------------------------------------------------------------- eager autograd

def _reference_for_backward(inputs, saved: SNSaved, options) -> Tensor:
    """The layer recomputed with the reference, for gradients with grad mode on
    (:func:`~mmsn.ops.launching.exact_gradients`)."""
    x, mean_weight, var_weight, weight, bias = inputs
    config, use_batch_stats, sync = options
    n, c = x.shape[:2]
    running = (None, None)
    if not use_batch_stats:  # the running statistics as the forward read them
        running = (saved.stats[2 * n:2 * n + c], saved.stats[2 * n + c:2 * n + 2 * c])
    return switch_norm_reference(x, mean_weight, var_weight, weight, bias, *running, None,
                                 config, use_batch_stats=use_batch_stats, sync=sync)


def _eager_backward(dy, inputs, saved: SNSaved, options, input_grad: bool):
    x, mean_weight, var_weight, weight, _ = inputs
    config, use_batch_stats, sync = options
    return sn_backward(dy, x, mean_weight, var_weight, weight, saved, config,
                       use_batch_stats=use_batch_stats, sync=sync, input_grad=input_grad)


class _SwitchNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_weight, var_weight, weight, bias, running_mean, running_var,
                num_batches_tracked, config: SNConfig, use_batch_stats: bool, sync):
        running = None if running_mean is None else \
            (running_mean, running_var, num_batches_tracked)
        y, saved = sn_forward(x, mean_weight, var_weight, weight, bias, running, config,
                              use_batch_stats=use_batch_stats, sync=sync)
        ctx.save_for_backward(x, mean_weight, var_weight, weight, bias, *saved)
        ctx.options = (config, use_batch_stats, sync)
        return y

    @staticmethod
    def backward(ctx, dy):
        return exact_gradients(ctx, dy, SNSaved, _reference_for_backward,
                               _eager_backward) + (None,) * 6


# ------------------------------------------------------------------- torch.compile: custom ops
# (custom ops take scalars, not a config: they rebuild it; they take no process group)

@torch.library.custom_op('mmsn::sn_forward', mutates_args=())
def _sn_forward_op(x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                   weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                   momentum: Optional[float], eps: float, logits: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sn_forward`` without mutation: also returns the updated running statistics (the
    caller copies them into the buffers), as custom ops with autograd may not mutate."""
    if running_mean is None:
        running = updated = None
        new = no_running_statistics(x)
    else:
        running = (running_mean, running_var, num_batches_tracked)
        new = updated = tuple(t.clone() for t in running)
    config = SNConfig(momentum=momentum, eps=eps, logits=logits)
    y, saved = sn_forward(x, mean_weight, var_weight, weight, bias, running, config,
                          use_batch_stats=use_batch_stats, updated=updated)
    return (y,) + tuple(saved) + new


@_sn_forward_op.register_fake
def _(x, mean_weight, var_weight, weight, bias, running_mean, running_var, num_batches_tracked,
      use_batch_stats, momentum, eps, logits):
    n, c = x.shape[:2]
    dtype = stats_dtype(x)
    nc = x.new_empty((n, c), dtype=dtype)
    running = no_running_statistics(x) if running_mean is None else \
        (torch.empty_like(running_mean), torch.empty_like(running_var),
         torch.empty_like(num_batches_tracked))
    return (torch.empty_like(x), nc, torch.empty_like(nc), x.new_empty(2 * n + 2 * c + 1,
                                                                         dtype=dtype),
            torch.empty_like(nc)) + running


@torch.library.custom_op('mmsn::sn_backward', mutates_args=())
def _sn_backward_op(dy: Tensor, x: Tensor, mean_in: Tensor, var_in: Tensor, stats: Tensor,
                    scale: Tensor, mean_weight: Tensor, var_weight: Tensor,
                    weight: Optional[Tensor], use_batch_stats: bool, eps: float, logits: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = SNConfig(momentum=None, eps=eps, logits=logits)  # (momentum: forward only)
    dx, d_mean_weight, d_var_weight, d_weight, d_bias = sn_backward(
        dy, x, mean_weight, var_weight, weight, SNSaved(mean_in, var_in, stats, scale), config,
        use_batch_stats=use_batch_stats)
    if weight is None:
        d_weight, d_bias = (x.new_empty(0, dtype=torch.float32) for _ in range(2))
    return dx, d_mean_weight, d_var_weight, d_weight, d_bias


@_sn_backward_op.register_fake
def _(dy, x, mean_in, var_in, stats, scale, mean_weight, var_weight, weight, use_batch_stats,
      eps, logits):
    affine = (torch.empty_like(weight), torch.empty_like(weight)) if weight is not None else \
        (x.new_empty(0, dtype=torch.float32),) * 2
    return (torch.empty_like(x), torch.empty_like(mean_weight), torch.empty_like(var_weight)
            ) + affine


def _sn_op_setup(ctx, inputs, output):
    x, mean_weight, var_weight, weight, bias = inputs[:5]
    ctx.save_for_backward(x, mean_weight, var_weight, weight, bias, *output[1:5])
    ctx.mark_non_differentiable(*output[1:])
    use_batch_stats, momentum, eps, logits = inputs[8:]
    ctx.options = (SNConfig(momentum=momentum, eps=eps, logits=logits), use_batch_stats, None)


def _compiled_backward(dy, inputs, saved: SNSaved, options, input_grad: bool):
    x, mean_weight, var_weight, weight, _ = inputs
    config, use_batch_stats, _ = options
    return torch.ops.mmsn.sn_backward(dy, x, *saved, mean_weight, var_weight, weight,
                                      use_batch_stats, config.eps, config.logits)


def _sn_op_backward(ctx, dy, *unused):
    return exact_gradients(ctx, dy, SNSaved, _reference_for_backward,
                           _compiled_backward) + (None,) * 7


_sn_forward_op.register_autograd(_sn_op_backward, setup_context=_sn_op_setup)


def _switch_norm_compiled(x, mean_weight, var_weight, weight, bias, running_mean, running_var,
                          num_batches_tracked, config: SNConfig, use_batch_stats: bool):
    outputs = torch.ops.mmsn.sn_forward(
        x, mean_weight, var_weight, weight, bias, running_mean, running_var,
        num_batches_tracked, use_batch_stats, config.momentum, config.eps, config.logits)
    if running_mean is not None and use_batch_stats:
        for buffer, new in zip((running_mean, running_var, num_batches_tracked), outputs[5:]):
            buffer.copy_(new.detach())
    return outputs[0]


def switch_norm_triton(x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                       weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       num_batches_tracked: Optional[Tensor], config: SNConfig, *,
                       use_batch_stats: bool, sync: Optional[object] = None,
                       compiling: bool = False) -> Tensor:
    """Switchable Normalization on the Triton kernels; the arguments as for
    :func:`~mmsn.ops.reference.switch_norm_reference`; ``compiling`` selects the custom ops
    that torch.compile traces."""
    if not compiling:  # (the ops make their own views; dynamo needs no try/except here)
        x = viewable(x)
    if config.momentum is None and num_batches_tracked is None and running_mean is not None:
        raise ValueError('momentum=None (cumulative average) needs num_batches_tracked')
    if compiling and pooled_processes(sync) == 1:
        return _switch_norm_compiled(x, mean_weight, var_weight, weight, bias, running_mean,
                                     running_var, num_batches_tracked, config, use_batch_stats)
    return _SwitchNormFunction.apply(x, mean_weight, var_weight, weight, bias, running_mean,
                                     running_var, num_batches_tracked, config, use_batch_stats,
                                     sync)


__all__ = ['switch_norm_triton', 'sn_forward', 'sn_backward', 'SNSaved', 'SNPlan']
