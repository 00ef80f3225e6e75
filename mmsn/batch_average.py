"""Batch-average inference statistics (SN paper, Sec. 3.2).

Instead of the moving averages kept during training, the BN branch of every SN/SW layer
gets the average of its batch statistics over K training mini-batches, fed through the
frozen network.
"""
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .layers import SwitchableLayer


def batch_statistics_layers(model: nn.Module) -> list:
    """The SN/SW layers of ``model`` that have a BN/BW branch (running statistics)."""
    return [m for m in model.modules() if isinstance(m, SwitchableLayer)
            and getattr(m, 'running_mean', None) is not None]


@torch.no_grad()
def batch_average_statistics(model: nn.Module, batches: Iterable, forward: Callable[[Any], Any],
                             num_batches: Optional[int] = None,
                             process_group: Optional[object] = None) -> int:
    """Replaces the running statistics of every SN/SW layer by the average of its batch
    statistics over ``batches``; weights and every other layer stay as they are.

    Args:
        model: the network; its SN/SW layers are put in train mode, everything else in eval.
        batches: an iterable of inputs for ``forward``.
        forward: runs the model on one batch (e.g. ``model.val_step``).
        num_batches: stop after this many batches (default: all of ``batches``).
        process_group: in distributed runs, the averages are then averaged over this group
            (default: the world, when ``torch.distributed`` is initialised).

    Returns:
        int: the number of batches used on this process.
    """
    layers = batch_statistics_layers(getattr(model, 'module', model))
    if not layers:
        return 0
    was_training = model.training
    saved = [(m, m.momentum) for m in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: running = mean of the batch statistics
        layer.train()
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            forward(batch)
            used += 1
    finally:
        for layer, momentum in saved:
            layer.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError('batches: expected at least one batch, got none')
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(process_group)
        if world > 1:
            for layer in layers:
                for buffer in (layer.running_mean, _running_second_moment(layer)):
                    dist.all_reduce(buffer, group=process_group)
                    buffer.div_(world)
    return used


def _running_second_moment(layer: nn.Module) -> torch.Tensor:
    return layer.running_var if hasattr(layer, 'running_var') else layer.running_cov
