"""Swapping SN/SW layers for their synchronized variants and back, keeping their state."""
from typing import Optional, Type

from torch import nn

from .sparse_switch_norm import SparseSwitchNorm2d
from .switch_norm import SwitchNorm2d, SyncSwitchNorm, _SwitchNorm
from .switch_whiten import SwitchWhiten2d, SyncSwitchWhiten2d

_SN_ARGS = ('eps', 'momentum', 'affine', 'using_bn', 'last_gamma')
_SW_ARGS = ('num_pergroup', 'sw_type', 'T', 'tie_weight', 'eps', 'momentum', 'affine', 'method')


def _rebuild(module: nn.Module, cls: Type[nn.Module], arg_names, **extra) -> nn.Module:
    new = cls(module.num_features, **{k: getattr(module, k) for k in arg_names}, **extra)
    new.load_state_dict(module.state_dict())
    for new_param, old_param in zip(new.parameters(), module.parameters()):
        new_param.requires_grad_(old_param.requires_grad)
    new.train(module.training)
    return new


def _swap(module: nn.Module, replace) -> nn.Module:
    new = replace(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        new_child = _swap(child, replace)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_sn(module: nn.Module, group: Optional[object] = None) -> nn.Module:
    """Replaces every SN layer by SyncSN and every SW layer by SyncSW, keeping their state.

    Args:
        module (nn.Module): the model (or a single layer).
        group (ProcessGroup, optional): the group to synchronize over. Defaults to the world.

    Returns:
        nn.Module: the converted module (``module`` itself, changed in place, unless it is a
        layer that had to be replaced).
    """
    def replace(m):
        if isinstance(m, _SwitchNorm) and not isinstance(m, (SyncSwitchNorm, SparseSwitchNorm2d)):
            # (SSN has no synchronized form yet: it stays local)
            new = _rebuild(m, SyncSwitchNorm, _SN_ARGS, group=group)
            new._reverted_cls = type(m)
            return new
        if isinstance(m, SwitchWhiten2d) and not isinstance(m, SyncSwitchWhiten2d):
            return _rebuild(m, SyncSwitchWhiten2d, _SW_ARGS, group=group)
        return None
    return _swap(module, replace)


def revert_sync_sn(module: nn.Module) -> nn.Module:
    """Replaces every SyncSN layer by SN (the class it was converted from, else
    :class:`SwitchNorm2d`) and every SyncSW by SW, keeping their state."""
    def replace(m):
        if isinstance(m, SyncSwitchNorm):
            return _rebuild(m, getattr(m, '_reverted_cls', SwitchNorm2d), _SN_ARGS)
        if isinstance(m, SyncSwitchWhiten2d):
            return _rebuild(m, SwitchWhiten2d, _SW_ARGS)
        return None
    return _swap(module, replace)
