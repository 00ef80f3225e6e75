"""SW on the Triton kernels: four launches forward, five backward (``library.py``).

Forward: the moments pass, the BW moments (training), the mixing kernel (mixed mean and
covariance, Newton's iteration, affine; the running-statistics update), the whitening pass.
Backward: the sums pass, the mixing step's vector-Jacobian product in three small kernels,
the ``dx`` pass. Synchronized layers add one stage and one collective each way. At 64
channels per group Newton's iterates go through scratch memory (they do not fit in
registers), in the same kernels.

As for SN (``triton_switch_norm.py``), :func:`~mmsn.ops.library.sw_forward` and
:func:`~mmsn.ops.library.sw_backward` serve both eager autograd (:class:`_SwitchWhitenFunction`)
and torch.compile (the ``mmsn::sw_forward`` / ``mmsn::sw_backward`` custom ops, which take no
process group: synchronized layers run the eager Function there, a graph break); a backward
with grad mode on (``create_graph=True``) differentiates the reference instead.
"""
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .distributed import sync_world_size
from .library import (as_groups, batch_moments_views, sw_backward, sw_forward,
                      sw_kernels_refuse, viewable)
from .reference import ratios_of, switch_whiten_reference


@dataclasses.dataclass(frozen=True)
class SWConfig:
    """What an SW call does besides its tensors."""
    use_batch_stats: bool
    group_size: int
    sw_type: int
    iterations: int
    momentum: Optional[float]
    eps: float
    logits: bool = True
    process_group: Optional[object] = None
    sync: bool = False


def _reference_backward(inputs, needs, batch, dy, config: SWConfig):
    """Differentiable gradients of the inputs that need one, through the reference."""
    x, mean_logit, var_logit, weight, bias = inputs
    groups, c = x.shape[1] // config.group_size, config.group_size
    running = (None, None)
    if not config.use_batch_stats:  # the running statistics as the forward read them
        mean, cov = batch_moments_views(batch, groups, c)
        running = (mean.reshape(groups, c, 1), cov.reshape(groups, c, c))
    with torch.enable_grad():
        y = switch_whiten_reference(
            x, ratios_of(mean_logit, config.logits), ratios_of(var_logit, config.logits),
            weight, bias, *running, None, config.use_batch_stats, config.group_size,
            config.sw_type, config.iterations, config.momentum, config.eps, 'newton',
            config.process_group, config.sync)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


class _SwitchWhitenFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_logit, var_logit, weight, bias, running_mean, running_cov,
                num_batches_tracked, config: SWConfig):
        running = None if running_mean is None else \
            (running_mean, running_cov, num_batches_tracked)
        y, *saved = sw_forward(
            x, mean_logit, var_logit, weight, bias, running, config.use_batch_stats,
            config.group_size, config.sw_type, config.iterations, config.momentum, config.eps,
            config.logits, config.process_group, config.sync)
        ctx.save_for_backward(x, mean_logit, var_logit, weight, bias, *saved)
        ctx.config = config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean_logit, var_logit, weight, bias, *saved = ctx.saved_tensors
        config = ctx.config
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            grads = _reference_backward((x, mean_logit, var_logit, weight, bias), needs,
                                        saved[2], dy, config)
        else:
            grads = sw_backward(dy, x, *saved, mean_logit, var_logit, weight, bias,
                                config.use_batch_stats, config.group_size, config.sw_type,
                                config.iterations, config.eps, config.logits,
                                config.process_group, config.sync, input_grad=needs[0])
            grads = tuple(g if need else None for g, need in zip(grads, needs))
        return grads + (None,) * 4


# ------------------------------------------------------------------- torch.compile: custom ops

def _empty_running(x: Tensor):
    return (x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32),
            x.new_empty(0, dtype=torch.long))


@torch.library.custom_op('mmsn::sw_forward', mutates_args=())
def _sw_forward_op(x: Tensor, mean_logit: Tensor, var_logit: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_cov: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                   use_batch_stats: bool, group_size: int, sw_type: int, iterations: int,
                   momentum: Optional[float], eps: float, logits: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor]:
    """``sw_forward`` without mutation: also returns the updated running statistics (the
    caller copies them into the buffers), as custom ops with autograd may not mutate."""
    if running_mean is None:
        running = updated = None
        new = _empty_running(x)
    else:
        running = (running_mean, running_cov, num_batches_tracked)
        new = updated = tuple(None if t is None else t.clone() for t in running)
        if num_batches_tracked is None:
            new = updated = new[:2] + (x.new_zeros((), dtype=torch.long),)
    outputs = sw_forward(x, mean_logit, var_logit, weight, bias, running, use_batch_stats,
                         group_size, sw_type, iterations, momentum, eps, logits,
                         updated=updated)
    return tuple(outputs) + tuple(new)


@_sw_forward_op.register_fake
def _(x, mean_logit, var_logit, weight, bias, running_mean, running_cov, num_batches_tracked,
      use_batch_stats, group_size, sw_type, iterations, momentum, eps, logits):
    n, groups, c = x.shape[0], x.shape[1] // group_size, group_size
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    matrix = x.new_empty((n, groups, c, c), dtype=dtype)
    vector = x.new_empty((n, groups, c), dtype=dtype)
    running = _empty_running(x) if running_mean is None else \
        (torch.empty_like(running_mean), torch.empty_like(running_cov),
         x.new_empty((), dtype=torch.long))
    return (torch.empty_like(x), vector, torch.empty_like(matrix),
            x.new_empty(groups * c + groups * c * c + 1, dtype=dtype), torch.empty_like(matrix),
            torch.empty_like(vector)) + running


@torch.library.custom_op('mmsn::sw_backward', mutates_args=())
def _sw_backward_op(dy: Tensor, x: Tensor, mean: Tensor, cov: Tensor, batch: Tensor,
                    matrix: Tensor, centre: Tensor, mean_logit: Tensor, var_logit: Tensor,
                    weight: Optional[Tensor], bias: Optional[Tensor], use_batch_stats: bool,
                    group_size: int, sw_type: int, iterations: int, eps: float, logits: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, d_mean_logit, d_var_logit, d_weight, d_bias = sw_backward(
        dy, x, mean, cov, batch, matrix, centre, mean_logit, var_logit, weight, bias,
        use_batch_stats, group_size, sw_type, iterations, eps, logits)
    empty = lambda: x.new_empty(0, dtype=torch.float32)  # noqa: E731
    return (dx, d_mean_logit, d_var_logit, empty() if d_weight is None else d_weight,
            empty() if d_bias is None else d_bias)


@_sw_backward_op.register_fake
def _(dy, x, mean, cov, batch, matrix, centre, mean_logit, var_logit, weight, bias,
      use_batch_stats, group_size, sw_type, iterations, eps, logits):
    affine = tuple(x.new_empty(0, dtype=torch.float32) if p is None else torch.empty_like(p)
                   for p in (weight, bias))
    return (torch.empty_like(x), torch.empty_like(mean_logit), torch.empty_like(var_logit)
            ) + affine


def _sw_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output[1:6])
    ctx.mark_non_differentiable(*output[1:])
    ctx.config = SWConfig(inputs[8], inputs[9], inputs[10], inputs[11], inputs[12],
                          inputs[13], inputs[14])


def _sw_op_backward(ctx, dy, *unused):
    x, mean_logit, var_logit, weight, bias, *saved = ctx.saved_tensors
    config = ctx.config
    needs = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():
        grads = _reference_backward((x, mean_logit, var_logit, weight, bias), needs, saved[2],
                                    dy, config)
    else:
        grads = torch.ops.mmsn.sw_backward(
            dy, x, *saved, mean_logit, var_logit, weight, bias, config.use_batch_stats,
            config.group_size, config.sw_type, config.iterations, config.eps, config.logits)
        grads = tuple(g if need else None for g, need in zip(grads, needs))
    return grads + (None,) * 10


_sw_forward_op.register_autograd(_sw_op_backward, setup_context=_sw_op_setup)


def _switch_whiten_compiled(x, mean_logit, var_logit, weight, bias, running_mean, running_cov,
                            num_batches_tracked, config: SWConfig):
    outputs = torch.ops.mmsn.sw_forward(
        x, mean_logit, var_logit, weight, bias, running_mean, running_cov, num_batches_tracked,
        config.use_batch_stats, config.group_size, config.sw_type, config.iterations,
        config.momentum, config.eps, config.logits)
    if running_mean is not None and config.use_batch_stats:
        for buffer, new in zip((running_mean, running_cov, num_batches_tracked), outputs[6:]):
            if buffer is not None:
                buffer.copy_(new.detach())
    return outputs[0]


def switch_whiten_triton(x: Tensor, mean_logit: Tensor, var_logit: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_cov: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                         num_pergroup: int, sw_type: int, iterations: int,
                         momentum: Optional[float], eps: float, method: str = 'newton',
                         process_group: Optional[object] = None, sync: bool = False,
                         logits: bool = False, compiling: bool = False) -> Tensor:
    """Switchable Whitening on the Triton kernels; arguments as for
    :func:`~mmsn.ops.reference.switch_whiten_reference`, except that ``mean_logit`` and
    ``var_logit`` are logits when ``logits`` (else ratios); ``compiling`` selects the custom
    ops that torch.compile traces. Raises ``ValueError`` for a call the kernels do not take
    (:func:`~mmsn.ops.library.sw_kernels_refuse`)."""
    refusal = sw_kernels_refuse(num_pergroup, method, x.dtype)
    if refusal:
        raise ValueError(f'{refusal} (use the reference: MMSN_BACKEND=torch)')
    if (momentum is None and num_batches_tracked is None and running_mean is not None
            and use_batch_stats):
        raise ValueError('momentum=None (cumulative average) needs num_batches_tracked')
    if not compiling:  # (the ops make their own views; dynamo needs no try/except here)
        x = viewable(x, lambda t: as_groups(t, num_pergroup))
    config = SWConfig(use_batch_stats, num_pergroup, sw_type, iterations, momentum, eps,
                      logits, process_group, sync)
    if compiling and not (sync and sync_world_size(process_group) > 1):
        return _switch_whiten_compiled(x, mean_logit, var_logit, weight, bias, running_mean,
                                       running_cov, num_batches_tracked, config)
    return _SwitchWhitenFunction.apply(x, mean_logit, var_logit, weight, bias, running_mean,
                                       running_cov, num_batches_tracked, config)
