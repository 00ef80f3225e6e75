"""SW's fast path: the launches of the Triton kernels, their autograd Function and their
custom ops for torch.compile. The kernels are in ``mmsn/kernels/switch_whiten.py`` (the
streaming passes over ``x``) and ``mmsn/kernels/switch_whiten_mixing.py`` (the mixing step
and Newton's iteration); what every launch shares is in ``launching.py``.

Forward, four launches: the moments pass, the BW moments (training), the mixing kernel
(mixed mean and covariance, Newton's iteration, affine; the running-statistics update), the
whitening pass. Backward, five: the sums pass, the mixing step's vector-Jacobian product in
three small kernels, the ``dx`` pass. A synchronized layer adds one stage and one collective
each way. At 64 channels per group Newton's iterates go through scratch memory (they do not
fit in registers), in the same kernels.

As for SN (``triton_switch_norm.py``), :func:`sw_forward` and :func:`sw_backward` serve both
eager autograd (:class:`_SwitchWhitenFunction`) and torch.compile (the ``mmsn::sw_forward`` /
``mmsn::sw_backward`` custom ops, which take no process group: synchronized layers run the
eager Function there, a graph break); a backward with grad mode on (``create_graph=True``)
differentiates the reference instead.

Names: ``num_pergroup`` (channels per group) and ``T`` (Newton's iterations) are the
authors'; the kernels spell them ``C_PER`` and ``ITERATIONS`` (constexprs).
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .configs import SWConfig
from .distributed import pooled_processes
from .launching import (accumulator, as_groups, block_size, cdiv, exact_gradients, flat_grid,
                        has_work, launch, no_running_statistics, positions, split_reduction,
                        strides, viewable)
from .reference import stats_dtype, switch_whiten_reference

#: SW group sizes the kernels take (``tl.dot`` needs power-of-two sides of at least 16)
KERNEL_GROUP_SIZES = (16, 32, 64)


def sw_kernels_refuse(num_pergroup: int, method: str, dtype: torch.dtype) -> Optional[str]:
    """Why the SW kernels do not take a layer call (None when they do), naming the argument.

    Float64 at 64 channels per group is left to the reference: Newton's backward on 64 x 64
    double iterates spills 260-940 bytes a thread at any warp count on sm_80 and sm_90
    (``mmsn.tools.compile_check``), and float64 on a GPU is for checking, not for speed.
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


#: (positions per tile, warps) of each SW pass by channels per group. The IEEE-float32
#: ``tl.dot`` runs on CUDA cores and keeps its operand tiles and the c x c matrices in
#: registers, so the tile shrinks as c grows: these fit 128 registers per thread without
#: spills on sm_80 and sm_90 in every dtype and layout (``mmsn.tools.compile_check``; with
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


def _sw_mixing_options(kernel: str, num_pergroup: int, dtype: torch.dtype) -> dict:
    """``num_warps`` of one of SW's small kernels (registers:
    :func:`~mmsn.ops.launching.register_cap`)."""
    warps = _SW_MIX_WARPS[kernel][num_pergroup]
    if dtype == torch.float64:
        warps = _SW_MIX_WARPS_FLOAT64.get((kernel, num_pergroup), warps)
    return dict(num_warps=warps)


#: Group sizes whose mixing kernel runs Newton's iteration forward in registers. At 64 the
#: 64 x 64 iterates and products spill kilobytes at any warp count: there the forward goes
#: through scratch memory as the backward always does (``_inverse_sqrt_scratch``).
_NEWTON_IN_REGISTERS = (16, 32)


class SWSaved(NamedTuple):
    """What :func:`sw_forward` keeps for :func:`sw_backward` besides the inputs."""
    mean: Tensor    #: ``(N, G, c)`` IW means
    cov: Tensor     #: ``(N, G, c, c)`` IW covariances
    #: ``[mu_B, Sigma_B, M]`` as used, M the element count (:func:`batch_moments_views`)
    batch: Tensor
    matrix: Tensor  #: ``(N, G, c, c)`` the whitening pass's matrix
    centre: Tensor  #: ``(N, G, c)`` the whitening pass's centre


def batch_moments_views(batch: Tensor, groups: int, c: int) -> Tuple[Tensor, Tensor]:
    """The BW mean ``(G c,)`` and covariance ``(G c c,)`` parts of the ``batch`` buffer
    ``[mean, cov, M]`` (M: the element count) that :func:`sw_forward` fills and saves."""
    return batch[:groups * c], batch[groups * c:-1]


def _pass_options(num_pergroup: int, dtype: torch.dtype, length: int, kind: str) -> dict:
    """Constexprs and warps of one of SW's streaming passes (:data:`_SW_PLANS`)."""
    tile, warps = _SW_PLANS[kind][num_pergroup]
    return dict(C_PER=num_pergroup, BLOCK=block_size(length, tile), ACC=accumulator(dtype),
                PRECISION='ieee', POSITIONS=positions(length), num_warps=warps)


def _groups_view(t: Tensor, num_pergroup: int) -> Tensor:
    return as_groups(viewable(t, lambda u: as_groups(u, num_pergroup)), num_pergroup)


def sw_moments(x: Tensor, num_pergroup: int) -> Tuple[Tensor, Tensor]:
    """IW mean ``(N, G, c)`` and population covariance ``(N, G, c, c)`` of each sample's
    groups of ``num_pergroup`` contiguous channels: one launch (plus the merge of the splits
    when the reduction over L is split)."""
    from ..kernels.switch_whiten import _group_moments_kernel
    x4 = _groups_view(x, num_pergroup)
    n, groups, c, length = x4.shape
    dtype = stats_dtype(x)
    if not has_work(n, groups, length):
        return (x.new_zeros((n, groups, c), dtype=dtype),
                x.new_zeros((n, groups, c, c), dtype=dtype))
    options = _pass_options(c, dtype, length, 'moments')
    splits, chunk = split_reduction(n * groups, length, options['BLOCK'], x.device)
    first = x.new_empty((n, groups, c), dtype=dtype)
    grid = flat_grid(n * groups, splits)
    common = dict(x_ptr=x4, pivot_ptr=first, G=groups, L=length, NG=n * groups, chunk=chunk,
                  **strides(x4), **options)
    if splits == 1:
        cov = x.new_empty((n, groups, c, c), dtype=dtype)
        launch(_group_moments_kernel, grid, total_ptr=first, gram_ptr=cov, FINAL=True,
               **common)
        return first, cov
    totals = x.new_empty((splits, n, groups, c), dtype=dtype)
    grams = x.new_empty((splits, n, groups, c, c), dtype=dtype)
    launch(_group_moments_kernel, grid, total_ptr=totals, gram_ptr=grams, FINAL=False,
           **common)
    # sums of x - pivot (the first column): no cancellation for large means
    mean = totals.sum(0) / length
    cov = grams.sum(0) / length - mean[..., :, None] * mean[..., None, :]
    return first + mean, cov


def _pointwise_pass(kernel, kind: str, x: Tensor, num_pergroup: int, dtype: torch.dtype,
                    output: str, streams: Optional[dict] = None, **arguments) -> Tensor:
    """One of SW's pointwise passes: ``kernel`` over each (n, group)'s positions of ``x``,
    writing a tensor like ``x`` (argument ``{output}_ptr``, strides ``{output}_stride_*``);
    ``streams``: the other tensors like ``x`` it reads, by argument name."""
    x4 = _groups_view(x, num_pergroup)
    result = torch.empty_like(x)
    n, groups, c, length = x4.shape
    if has_work(n, groups, length):
        views = {output: as_groups(result, num_pergroup)}
        views.update((name, _groups_view(t, num_pergroup)) for name, t in (streams or {}).items())
        for name, view in views.items():
            arguments.update({f'{name}_ptr': view}, **strides(view, f'{name}_'))
        options = _pass_options(c, dtype, length, kind)
        grid = flat_grid(n * groups, cdiv(length, options['BLOCK']))
        launch(kernel, grid, x_ptr=x4, G=groups, L=length, NG=n * groups, **strides(x4),
               **arguments, **options)
    return result


def sw_whiten(x: Tensor, matrix: Tensor, centre: Tensor, shift: Tensor,
              num_pergroup: int) -> Tensor:
    """``y = matrix @ (x - centre) + shift`` on each (n, group): ``matrix`` ``(N, G, c, c)``,
    ``centre`` and ``shift`` ``(N, G, c)``, computed in their dtype."""
    from ..kernels.switch_whiten import _whiten_kernel
    return _pointwise_pass(_whiten_kernel, 'whiten', x, num_pergroup, matrix.dtype, 'y',
                           matrix_ptr=matrix, centre_ptr=centre, shift_ptr=shift)


def sw_grad_sums(x: Tensor, dy: Tensor, centre: Tensor,
                 num_pergroup: int) -> Tuple[Tensor, Tensor]:
    """Per split of L: ``sum(dy (x - centre)^T)`` ``(S, N, G, c, c)`` and ``sum(dy)``
    ``(S, N, G, c)``, in the dtype of ``centre`` (the mixing kernels add the splits)."""
    from ..kernels.switch_whiten import _whiten_grad_sums_kernel
    x4, dy4 = _groups_view(x, num_pergroup), _groups_view(dy, num_pergroup)
    n, groups, c, length = x4.shape
    if not has_work(n, groups, length):
        return (x.new_zeros((1, n, groups, c, c), dtype=centre.dtype),
                x.new_zeros((1, n, groups, c), dtype=centre.dtype))
    options = _pass_options(c, centre.dtype, length, 'grad_sums')
    splits, chunk = split_reduction(n * groups, length, options['BLOCK'], x.device)
    outers = x.new_empty((splits, n, groups, c, c), dtype=centre.dtype)
    sums_dy = x.new_empty((splits, n, groups, c), dtype=centre.dtype)
    grid = flat_grid(n * groups, splits)
    launch(_whiten_grad_sums_kernel, grid, x_ptr=x4, dy_ptr=dy4, centre_ptr=centre,
           outer_ptr=outers, sum_dy_ptr=sums_dy, G=groups, L=length, NG=n * groups,
           chunk=chunk, **strides(x4), **strides(dy4, 'dy_'), **options)
    return outers, sums_dy


def sw_grad_input(x: Tensor, dy: Tensor, matrix: Tensor, moment: Tensor, mean: Tensor,
                  vector: Tensor, num_pergroup: int) -> Tensor:
    """``dx = matrix^T @ dy + moment @ (x - mean) + vector`` on each (n, group), one pass."""
    from ..kernels.switch_whiten import _whiten_grad_input_kernel
    return _pointwise_pass(_whiten_grad_input_kernel, 'grad_input', x, num_pergroup,
                           matrix.dtype, 'dx', streams=dict(dy=dy), matrix_ptr=matrix,
                           moment_ptr=moment, mean_ptr=mean, vector_ptr=vector)


def sw_forward(x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], running: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]],
               config: SWConfig, *, use_batch_stats: bool, sync: Optional[object] = None,
               updated: Optional[Tuple[Tensor, Tensor, Tensor]] = None
               ) -> Tuple[Tensor, SWSaved]:
    """SW forward on the kernels: moments pass, BW moments (training; synchronized: two
    stages around one all-gather of the packed moments), mixing kernel, whitening pass.

    Args:
        x (Tensor): ``(N, C, H, W)`` input that
            :func:`~mmsn.ops.launching.as_groups` views without a copy.
        mean_weight, var_weight (Tensor): ``(sw_type,)`` ratio logits (``config.logits``) or
            ratios.
        weight, bias (Tensor, optional): ``(C,)`` affine parameters.
        running (tuple, optional): ``(running_mean, running_cov, num_batches_tracked)``.
        config (SWConfig): the layer's options (Newton's iteration: ``method`` is not read).
        use_batch_stats, sync, updated: as for
            :func:`~mmsn.ops.triton_switch_norm.sn_forward`, for BW.

    Returns:
        tuple: ``y`` and what the backward needs (:class:`SWSaved`).
    """
    from ..kernels.switch_whiten_mixing import _sw_batch_kernel, _sw_mix_kernel
    num_pergroup = config.num_pergroup
    n, groups, c, length = _groups_view(x, num_pergroup).shape
    dtype = stats_dtype(x)
    mean, cov = sw_moments(x, num_pergroup)
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
        world = pooled_processes(sync)
        arguments = dict(
            mean_ptr=mean, cov_ptr=cov, parts_ptr=batch, batch_ptr=batch,
            running_mean_ptr=running[0], running_cov_ptr=running[1], new_mean_ptr=updated[0],
            new_cov_ptr=updated[1], tracked_ptr=running[2], N=n, G=groups, L=length, R=world,
            momentum=0.0 if config.momentum is None else config.momentum, UPDATE=update,
            CUMULATIVE=config.momentum is None, **common,
            **_sw_mixing_options('batch', c, dtype))
        if world > 1:
            local = x.new_empty(1 + groups * c + groups * c * c, dtype=dtype)
            launch(_sw_batch_kernel, (groups,), **dict(arguments, parts_ptr=local), STAGE=1)
            gathered = x.new_empty(world * local.numel(), dtype=dtype)  # (gloo wants it flat)
            torch.distributed.all_gather_into_tensor(gathered, local, group=sync)
            launch(_sw_batch_kernel, (groups,), **dict(arguments, parts_ptr=gathered),
                   STAGE=2)
        else:
            launch(_sw_batch_kernel, (groups,), **arguments, STAGE=0)
        source = batch_moments_views(batch, groups, c)
    else:
        source = running[0], running[1]
    matrix = x.new_empty((n, groups, c, c), dtype=dtype)
    centre, shift = x.new_empty((2, n, groups, c), dtype=dtype).unbind()
    scratch = c not in _NEWTON_IN_REGISTERS
    launch(_sw_mix_kernel, (max(n * groups, 1),), mean_ptr=mean, cov_ptr=cov,
           batch_mean_ptr=source[0], batch_cov_ptr=source[1], batch_ptr=batch,
           mean_logit_ptr=mean_weight, var_logit_ptr=var_weight,
           weight_ptr=batch if weight is None else weight,
           bias_ptr=batch if bias is None else bias, tracked_ptr=running[2],
           new_tracked_ptr=updated[2], matrix_ptr=matrix, centre_ptr=centre, shift_ptr=shift,
           scratch_ptr=x.new_empty((n, groups, 4 if scratch else 0, c, c), dtype=dtype), N=n,
           G=groups, eps=config.eps, K=config.sw_type, LOGITS=config.logits,
           AFFINE=weight is not None, BIAS=bias is not None, BATCH=use_batch_stats,
           UPDATE=update, SCRATCH=scratch, ITERATIONS=config.T, PRECISION='ieee', **common,
           **_sw_mixing_options('forward', c, dtype))
    y = sw_whiten(x, matrix, centre, shift, num_pergroup)
    return y, SWSaved(mean, cov, batch, matrix, centre)


def sw_backward(dy: Tensor, x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                weight: Optional[Tensor], bias: Optional[Tensor], saved: SWSaved,
                config: SWConfig, *, use_batch_stats: bool, sync: Optional[object] = None,
                input_grad: bool = True) -> Tuple[Optional[Tensor], ...]:
    """SW backward on the kernels: the ``dy`` sums pass, the mixing step's vector-Jacobian
    product (per instance, per group, per instance; synchronized layers all-reduce the BW
    moments' gradients in between), the ``dx`` pass. ``x``, the parameters, ``saved`` and
    the options as :func:`sw_forward` had them.

    Returns:
        tuple: ``dx`` (None unless ``input_grad``) and the gradients of ``mean_weight``,
        ``var_weight``, ``weight`` and ``bias`` (None for a missing parameter).
    """
    from ..kernels.switch_whiten_mixing import (PARTIALS, _sw_batch_backward_kernel,
                                                _sw_input_coefficients_kernel,
                                                _sw_mix_backward_kernel)
    num_pergroup = config.num_pergroup
    dy = viewable(dy, lambda t: as_groups(t, num_pergroup))
    n, groups, c, length = _groups_view(x, num_pergroup).shape
    mean, batch = saved.mean, saved.batch
    dtype = mean.dtype
    common = dict(K=config.sw_type, LOGITS=config.logits, C_PER=c, ACC=accumulator(dtype))
    outers, sums_dy = sw_grad_sums(x, dy, saved.centre, num_pergroup)
    splits = outers.shape[0]
    d_cov = x.new_empty((n, groups, c, c), dtype=dtype)
    d_centre, d_gamma = x.new_empty((2, n, groups, c), dtype=dtype).unbind()
    partial = x.new_empty((n, groups, PARTIALS), dtype=dtype)
    affine = weight is not None
    batch_mean, batch_cov = batch_moments_views(batch, groups, c)
    if n * groups:
        launch(_sw_mix_backward_kernel, (n * groups,), mean_ptr=mean, cov_ptr=saved.cov,
               batch_mean_ptr=batch_mean, batch_cov_ptr=batch_cov, mean_logit_ptr=mean_weight,
               var_logit_ptr=var_weight, weight_ptr=batch if weight is None else weight,
               scratch_ptr=x.new_empty((n, groups, 3 * config.T + 3, c, c), dtype=dtype),
               outer_ptr=outers, sum_dy_ptr=sums_dy, d_cov_ptr=d_cov, d_centre_ptr=d_centre,
               d_gamma_ptr=d_gamma, partial_ptr=partial, N=n, G=groups, S=splits,
               eps=config.eps, AFFINE=affine, ITERATIONS=config.T, **common,
               **_sw_mixing_options('backward', c, dtype))
    grad_batch = x.new_empty(groups * c + groups * c * c, dtype=dtype)
    d_mean_weight, d_var_weight = torch.empty_like(mean_weight), torch.empty_like(var_weight)
    d_weight = torch.empty_like(weight) if affine else None
    d_bias = torch.empty_like(bias) if bias is not None else None
    launch(_sw_batch_backward_kernel, (groups,), d_cov_ptr=d_cov, d_centre_ptr=d_centre,
           d_gamma_ptr=d_gamma, sum_dy_ptr=sums_dy, partial_ptr=partial,
           mean_logit_ptr=mean_weight, var_logit_ptr=var_weight, grad_batch_ptr=grad_batch,
           d_weight_ptr=batch if d_weight is None else d_weight,
           d_bias_ptr=batch if d_bias is None else d_bias, d_mean_logit_ptr=d_mean_weight,
           d_var_logit_ptr=d_var_weight, N=n, G=groups, S=splits, AFFINE=affine,
           BIAS=bias is not None, BATCH=use_batch_stats, **common,
           **_sw_mixing_options('batch_backward', c, dtype))
    if use_batch_stats and pooled_processes(sync) > 1:
        torch.distributed.all_reduce(grad_batch, group=sync)
    dx = None
    if input_grad:
        moment = x.new_empty((n, groups, c, c), dtype=dtype)
        vector = x.new_empty((n, groups, c), dtype=dtype)
        if n * groups:
            launch(_sw_input_coefficients_kernel, (n * groups,), mean_ptr=mean,
                   batch_ptr=batch, d_cov_ptr=d_cov, d_centre_ptr=d_centre,
                   partial_ptr=partial, grad_batch_ptr=grad_batch, mean_logit_ptr=mean_weight,
                   var_logit_ptr=var_weight, moment_ptr=moment, vector_ptr=vector, N=n,
                   G=groups, L=length, BATCH=use_batch_stats, **common,
                   **_sw_mixing_options('coefficients', c, dtype))
        dx = sw_grad_input(x, dy, saved.matrix, moment, mean, vector, num_pergroup)
    return dx, d_mean_weight, d_var_weight, d_weight, d_bias


# ------------------------------------------------------------------------- eager autograd

def _reference_for_backward(inputs, saved: SWSaved, options) -> Tensor:
    """The layer recomputed with the reference, for gradients with grad mode on
    (:func:`~mmsn.ops.launching.exact_gradients`)."""
    x, mean_weight, var_weight, weight, bias = inputs
    config, use_batch_stats, sync = options
    groups, c = x.shape[1] // config.num_pergroup, config.num_pergroup
    running = (None, None)
    if not use_batch_stats:  # the running statistics as the forward read them
        mean, cov = batch_moments_views(saved.batch, groups, c)
        running = (mean.reshape(groups, c, 1), cov.reshape(groups, c, c))
    return switch_whiten_reference(x, mean_weight, var_weight, weight, bias, *running, None,
                                   config, use_batch_stats=use_batch_stats, sync=sync)


def _eager_backward(dy, inputs, saved: SWSaved, options, input_grad: bool):
    config, use_batch_stats, sync = options
    return sw_backward(dy, *inputs, saved, config, use_batch_stats=use_batch_stats, sync=sync,
                       input_grad=input_grad)


class _SwitchWhitenFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_weight, var_weight, weight, bias, running_mean, running_cov,
                num_batches_tracked, config: SWConfig, use_batch_stats: bool, sync):
        running = None if running_mean is None else \
            (running_mean, running_cov, num_batches_tracked)
        y, saved = sw_forward(x, mean_weight, var_weight, weight, bias, running, config,
                              use_batch_stats=use_batch_stats, sync=sync)
        ctx.save_for_backward(x, mean_weight, var_weight, weight, bias, *saved)
        ctx.options = (config, use_batch_stats, sync)
        return y

    @staticmethod
    def backward(ctx, dy):
        return exact_gradients(ctx, dy, SWSaved, _reference_for_backward,
                               _eager_backward) + (None,) * 6


# ------------------------------------------------------------------- torch.compile: custom ops
# (custom ops take scalars, not a config: they rebuild it; they take no process group)

@torch.library.custom_op('mmsn::sw_forward', mutates_args=())
def _sw_forward_op(x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_cov: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                   use_batch_stats: bool, num_pergroup: int, sw_type: int, T: int,
                   momentum: Optional[float], eps: float, logits: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor]:
    """``sw_forward`` without mutation: also returns the updated running statistics (the
    caller copies them into the buffers), as custom ops with autograd may not mutate."""
    if running_mean is None:
        running = updated = None
        new = no_running_statistics(x)
    else:
        running = (running_mean, running_cov, num_batches_tracked)
        new = updated = tuple(None if t is None else t.clone() for t in running)
        if num_batches_tracked is None:
            new = updated = new[:2] + (x.new_zeros((), dtype=torch.long),)
    config = SWConfig(num_pergroup=num_pergroup, sw_type=sw_type, T=T, momentum=momentum,
                      eps=eps, logits=logits)
    y, saved = sw_forward(x, mean_weight, var_weight, weight, bias, running, config,
                          use_batch_stats=use_batch_stats, updated=updated)
    return (y,) + tuple(saved) + tuple(new)


@_sw_forward_op.register_fake
def _(x, mean_weight, var_weight, weight, bias, running_mean, running_cov, num_batches_tracked,
      use_batch_stats, num_pergroup, sw_type, T, momentum, eps, logits):
    n, groups, c = x.shape[0], x.shape[1] // num_pergroup, num_pergroup
    dtype = stats_dtype(x)
    matrix = x.new_empty((n, groups, c, c), dtype=dtype)
    vector = x.new_empty((n, groups, c), dtype=dtype)
    running = no_running_statistics(x) if running_mean is None else \
        (torch.empty_like(running_mean), torch.empty_like(running_cov),
         x.new_empty((), dtype=torch.long))
    return (torch.empty_like(x), vector, torch.empty_like(matrix),
            x.new_empty(groups * c + groups * c * c + 1, dtype=dtype), torch.empty_like(matrix),
            torch.empty_like(vector)) + running


@torch.library.custom_op('mmsn::sw_backward', mutates_args=())
def _sw_backward_op(dy: Tensor, x: Tensor, mean: Tensor, cov: Tensor, batch: Tensor,
                    matrix: Tensor, centre: Tensor, mean_weight: Tensor, var_weight: Tensor,
                    weight: Optional[Tensor], bias: Optional[Tensor], use_batch_stats: bool,
                    num_pergroup: int, sw_type: int, T: int, eps: float, logits: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = SWConfig(num_pergroup=num_pergroup, sw_type=sw_type, T=T, momentum=None, eps=eps,
                      logits=logits)  # (momentum: forward only)
    dx, d_mean_weight, d_var_weight, d_weight, d_bias = sw_backward(
        dy, x, mean_weight, var_weight, weight, bias, SWSaved(mean, cov, batch, matrix, centre),
        config, use_batch_stats=use_batch_stats)
    empty = lambda: x.new_empty(0, dtype=torch.float32)  # noqa: E731
    return (dx, d_mean_weight, d_var_weight, empty() if d_weight is None else d_weight,
            empty() if d_bias is None else d_bias)


@_sw_backward_op.register_fake
def _(dy, x, mean, cov, batch, matrix, centre, mean_weight, var_weight, weight, bias,
      use_batch_stats, num_pergroup, sw_type, T, eps, logits):
    affine = tuple(x.new_empty(0, dtype=torch.float32) if p is None else torch.empty_like(p)
                   for p in (weight, bias))
    return (torch.empty_like(x), torch.empty_like(mean_weight), torch.empty_like(var_weight)
            ) + affine


def _sw_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output[1:6])
    ctx.mark_non_differentiable(*output[1:])
    use_batch_stats, num_pergroup, sw_type, T, momentum, eps, logits = inputs[8:]
    config = SWConfig(num_pergroup=num_pergroup, sw_type=sw_type, T=T, momentum=momentum,
                      eps=eps, logits=logits)
    ctx.options = (config, use_batch_stats, None)


def _compiled_backward(dy, inputs, saved: SWSaved, options, input_grad: bool):
    config, use_batch_stats, _ = options
    return torch.ops.mmsn.sw_backward(dy, inputs[0], *saved, *inputs[1:], use_batch_stats,
                                      config.num_pergroup, config.sw_type, config.T,
                                      config.eps, config.logits)


def _sw_op_backward(ctx, dy, *unused):
    return exact_gradients(ctx, dy, SWSaved, _reference_for_backward,
                           _compiled_backward) + (None,) * 10


_sw_forward_op.register_autograd(_sw_op_backward, setup_context=_sw_op_setup)


def _switch_whiten_compiled(x, mean_weight, var_weight, weight, bias, running_mean, running_cov,
                            num_batches_tracked, config: SWConfig, use_batch_stats: bool):
    outputs = torch.ops.mmsn.sw_forward(
        x, mean_weight, var_weight, weight, bias, running_mean, running_cov, num_batches_tracked,
        use_batch_stats, config.num_pergroup, config.sw_type, config.T, config.momentum,
        config.eps, config.logits)
    if running_mean is not None and use_batch_stats:
        for buffer, new in zip((running_mean, running_cov, num_batches_tracked), outputs[6:]):
            if buffer is not None:
                buffer.copy_(new.detach())
    return outputs[0]


def switch_whiten_triton(x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_cov: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], config: SWConfig, *,
                         use_batch_stats: bool, sync: Optional[object] = None,
                         compiling: bool = False) -> Tensor:
    """Switchable Whitening on the Triton kernels; the arguments as for
    :func:`~mmsn.ops.reference.switch_whiten_reference`; ``compiling`` selects the custom
    ops that torch.compile traces. Raises ``ValueError`` for a call the kernels do not take
    (:func:`sw_kernels_refuse`)."""
    refusal = sw_kernels_refuse(config.num_pergroup, config.method, x.dtype)
    if refusal:
        raise ValueError(f'{refusal} (use the reference: MMSN_BACKEND=torch)')
    if (config.momentum is None and num_batches_tracked is None and running_mean is not None
            and use_batch_stats):
        raise ValueError('momentum=None (cumulative average) needs num_batches_tracked')
    if not compiling:  # (the ops make their own views; dynamo needs no try/except here)
        x = viewable(x, lambda t: as_groups(t, config.num_pergroup))
    if compiling and pooled_processes(sync) == 1:
        return _switch_whiten_compiled(x, mean_weight, var_weight, weight, bias, running_mean,
                                       running_cov, num_batches_tracked, config,
                                       use_batch_stats)
    return _SwitchWhitenFunction.apply(x, mean_weight, var_weight, weight, bias, running_mean,
                                       running_cov, num_batches_tracked, config,
                                       use_batch_stats, sync)


__all__ = ['switch_whiten_triton', 'sw_forward', 'sw_backward', 'sw_kernels_refuse', 'SWSaved',
           'KERNEL_GROUP_SIZES']
