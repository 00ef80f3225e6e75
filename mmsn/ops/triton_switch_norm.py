"""SN on the Triton kernels: three launches forward, three backward (``library.py``).

Forward: the moments pass, the mixing kernel (LN, BN or running statistics, softmax ratios,
running update, affine), the normalize pass. Backward: the ``dy`` sums pass, the mixing
step's closed-form vector-Jacobian product, the ``dx`` pass. Synchronized layers add one
mixing stage and one collective each way.

The same two functions, :func:`~mmsn.ops.library.sn_forward` and
:func:`~mmsn.ops.library.sn_backward`, serve eager autograd (:class:`_SwitchNormFunction`)
and torch.compile (the ``mmsn::sn_forward`` / ``mmsn::sn_backward`` custom ops, which take
no process group: synchronized layers run the eager Function there, a graph break).

A backward run with grad mode on (``create_graph=True``: gradient penalties, double
backward) cannot use the kernels' closed form, which is not itself differentiable; it
recomputes the layer with the reference, without touching the running statistics, and
differentiates that, so second-order gradients are exact.
"""
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .distributed import sync_world_size
from .library import sn_backward, sn_forward, viewable
from .reference import ratios_of, switch_norm_reference


@dataclasses.dataclass(frozen=True)
class SNConfig:
    """What an SN call does besides its tensors."""
    use_batch_stats: bool
    momentum: Optional[float]
    eps: float
    logits: bool = True          # ratio inputs are logits (softmax here) or ratios
    process_group: Optional[object] = None
    sync: bool = False


def _reference_backward(inputs, needs, stats, dy, config: SNConfig):
    """Differentiable gradients of the inputs that need one, through the reference."""
    x, mean_weight, var_weight, weight, bias = inputs
    n, c = x.shape[:2]
    running = (None, None)
    if not config.use_batch_stats:  # the running statistics as the forward read them
        running = (stats[2 * n:2 * n + c], stats[2 * n + c:2 * n + 2 * c])
    with torch.enable_grad():
        y = switch_norm_reference(
            x, ratios_of(mean_weight, config.logits), ratios_of(var_weight, config.logits),
            weight, bias, *running, None, config.use_batch_stats, config.momentum, config.eps,
            config.process_group, config.sync)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


class _SwitchNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, mean_weight, var_weight, weight, bias, running_mean, running_var,
                num_batches_tracked, config: SNConfig):
        running = None if running_mean is None else \
            (running_mean, running_var, num_batches_tracked)
        y, mean_in, var_in, stats, scale = sn_forward(
            x, mean_weight, var_weight, weight, bias, running, config.use_batch_stats,
            config.momentum, config.eps, config.logits, config.process_group, config.sync)
        ctx.save_for_backward(x, mean_weight, var_weight, weight, bias, mean_in, var_in, stats,
                              scale)
        ctx.config = config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean_weight, var_weight, weight, bias, mean_in, var_in, stats, scale = \
            ctx.saved_tensors
        config = ctx.config
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            grads = _reference_backward((x, mean_weight, var_weight, weight, bias), needs,
                                        stats, dy, config)
        else:
            grads = sn_backward(dy, x, mean_in, var_in, stats, scale,
                                mean_weight, var_weight, weight, config.use_batch_stats,
                                config.eps, config.logits, config.process_group, config.sync,
                                input_grad=needs[0])
            grads = tuple(g if need else None for g, need in zip(grads, needs))
        return grads + (None,) * 4


# ------------------------------------------------------------------- torch.compile: custom ops

def _no_running(x: Tensor):
    """The op's running-statistics outputs for a layer without buffers: empty tensors."""
    return (x.new_empty(0, dtype=torch.float32),) * 2 + (x.new_empty(0, dtype=torch.long),)


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
        new = _no_running(x)
    else:
        running = (running_mean, running_var, num_batches_tracked)
        new = updated = tuple(t.clone() for t in running)
    y, mean_in, var_in, stats, scale = sn_forward(
        x, mean_weight, var_weight, weight, bias, running, use_batch_stats, momentum, eps,
        logits, updated=updated)
    return (y, mean_in, var_in, stats, scale) + new


@_sn_forward_op.register_fake
def _(x, mean_weight, var_weight, weight, bias, running_mean, running_var, num_batches_tracked,
      use_batch_stats, momentum, eps, logits):
    n, c = x.shape[:2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    nc = x.new_empty((n, c), dtype=dtype)
    running = _no_running(x) if running_mean is None else \
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
    dx, d_mean_weight, d_var_weight, d_weight, d_bias = sn_backward(
        dy, x, mean_in, var_in, stats, scale, mean_weight, var_weight, weight,
        use_batch_stats, eps, logits)
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
    ctx.options = inputs[8], inputs[10], inputs[11]  # use_batch_stats, eps, logits


def _sn_op_backward(ctx, dy, *unused):
    x, mean_weight, var_weight, weight, bias, mean_in, var_in, stats, scale = ctx.saved_tensors
    use_batch_stats, eps, logits = ctx.options
    needs = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():
        config = SNConfig(use_batch_stats, None, eps, logits)
        grads = _reference_backward((x, mean_weight, var_weight, weight, bias), needs, stats,
                                    dy, config)
    else:
        grads = torch.ops.mmsn.sn_backward(dy, x, mean_in, var_in, stats, scale, mean_weight,
                                           var_weight, weight, use_batch_stats, eps, logits)
        grads = tuple(g if need else None for g, need in zip(grads, needs))
    return grads + (None,) * 7


_sn_forward_op.register_autograd(_sn_op_backward, setup_context=_sn_op_setup)


def _switch_norm_compiled(x, mean_weight, var_weight, weight, bias, running_mean, running_var,
                          num_batches_tracked, config: SNConfig):
    outputs = torch.ops.mmsn.sn_forward(
        x, mean_weight, var_weight, weight, bias, running_mean, running_var,
        num_batches_tracked, config.use_batch_stats, config.momentum, config.eps, config.logits)
    if running_mean is not None and config.use_batch_stats:
        for buffer, new in zip((running_mean, running_var, num_batches_tracked), outputs[5:]):
            buffer.copy_(new.detach())
    return outputs[0]


def switch_norm_triton(x: Tensor, mean_weight: Tensor, var_weight: Tensor,
                       weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
                       momentum: Optional[float], eps: float,
                       process_group: Optional[object] = None, sync: bool = False,
                       logits: bool = True, compiling: bool = False) -> Tensor:
    """Switchable Normalization on the Triton kernels; arguments as for
    :func:`~mmsn.ops.reference.switch_norm_reference`, except that ``mean_weight`` and
    ``var_weight`` are logits when ``logits`` (else ratios); ``compiling`` selects the
    custom ops that torch.compile traces."""
    if not compiling:  # (the ops make their own views; dynamo needs no try/except here)
        x = viewable(x)
    config = SNConfig(use_batch_stats, momentum, eps, logits, process_group, sync)
    if momentum is None and num_batches_tracked is None and running_mean is not None:
        raise ValueError('momentum=None (cumulative average) needs num_batches_tracked')
    if compiling and not (sync and sync_world_size(process_group) > 1):
        return _switch_norm_compiled(x, mean_weight, var_weight, weight, bias, running_mean,
                                     running_var, num_batches_tracked, config)
    return _SwitchNormFunction.apply(x, mean_weight, var_weight, weight, bias, running_mean,
                                     running_var, num_batches_tracked, config)


__all__ = ['switch_norm_triton', 'SNConfig']
