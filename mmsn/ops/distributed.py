"""The one collective that synchronized layers need: a differentiable all-gather.

Each rank contributes a packed vector of partial moments (count, mean, M2); every rank merges
the gathered parts in the same order, so all ranks get bit-identical statistics, a rank with
an empty batch still joins (its count is zero), and unequal batches are weighted exactly.
Forward is one ``all_gather_into_tensor``, backward one ``all_reduce``: the gradient of the
total loss with respect to a rank's part is the sum over ranks of their local gradients for
that part.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def default_group() -> Optional[object]:
    """The world's process group, or None before torch.distributed is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD


def sync_world_size(group: Optional[object] = None) -> int:
    """World size of ``group``, or 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def pooled_processes(sync: Optional[object]) -> int:
    """How many processes' batches the batch statistics pool: 1 for ``sync=None`` (this
    process's batch) or before torch.distributed is initialised, else the size of ``sync``."""
    return 1 if sync is None else sync_world_size(sync)


class _AllGatherParts(torch.autograd.Function):

    @staticmethod
    def forward(ctx, part: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        gathered = part.new_empty((dist.get_world_size(group),) + part.shape)
        dist.all_gather_into_tensor(gathered.view(-1), part.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad_parts: Tensor):
        if torch.is_grad_enabled():
            # create_graph=True: the all-reduce below is invisible to autograd, so a second
            # derivative would miss every other rank's terms
            raise RuntimeError(
                'SyncSN/SyncSW: double backward (create_graph=True) through the synchronized '
                'batch statistics is not supported; it would silently drop the other '
                "processes' second-order terms. Use SN/SW (convert with mmsn.revert_sync_sn) "
                'for gradient penalties')
        grad_parts = grad_parts.contiguous()
        dist.all_reduce(grad_parts, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_parts[ctx.rank], None


def all_gather_parts(part: Tensor, group: Optional[object] = None) -> Tensor:
    """Gathers a 1-D tensor from every rank of ``group`` into ``(world_size, len)``.

    Differentiable: backward all-reduces the gradient, so a rank's part receives the
    gradients of every rank that used it.
    """
    if part.dim() != 1:
        raise ValueError(f'part: expected a 1-D tensor, got shape {tuple(part.shape)}')
    if torch.is_grad_enabled() and not part.requires_grad:
        # A rank whose part carries no gradient (an empty batch, a frozen input) must still
        # join the backward all-reduce that the other ranks run, or they would wait forever.
        part = part.detach().requires_grad_()
    return _AllGatherParts.apply(part, group)
