"""Swapping SN/SSN/SW layers for their synchronized variants and back, keeping their
parameters and buffers."""
from typing import Optional, Type

from torch import nn

from .sparse_switch_norm import SparseSwitchNorm2d, SyncSparseSwitchNorm2d
from .switch_norm import SwitchNorm2d, SyncSwitchNorm, _SwitchNorm
from .switch_whiten import SwitchWhiten2d, SyncSwitchWhiten2d

_SN_ARGS = ('eps', 'momentum', 'affine', 'using_bn', 'last_gamma')
_SSN_ARGS = ('eps', 'momentum', 'affine', 'last_gamma')
_SW_ARGS = ('num_pergroup', 'sw_type', 'T', 'tie_weight', 'eps', 'momentum', 'affine', 'method')


def _rebuild(module: nn.Module, cls: Type[nn.Module], arg_names, **extra) -> nn.Module:
    """A ``cls`` layer that takes over ``module``'s parameter and buffer OBJECTS (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does): dtype, device, ``requires_grad`` and
    optimizer references stay valid, and the training mode is kept."""
    new = cls(module.num_features, **{k: getattr(module, k) for k in arg_names}, **extra)
    if set(new._parameters) != set(module._parameters) or set(new._buffers) != set(
            module._buffers):
        raise ValueError(f'module: {type(module).__name__} has parameters '
                         f'{sorted(module._parameters)} and buffers {sorted(module._buffers)}, '
                         f'but {cls.__name__} expects {sorted(new._parameters)} and '
                         f'{sorted(new._buffers)}')
    new._parameters.update(module._parameters)
    new._buffers.update(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
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
    """Replaces every SN layer by SyncSN, SSN by SyncSSN and SW by SyncSW.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the new layers hold the same parameter
    and buffer objects: dtype, device, ``requires_grad``, the training mode and an optimizer
    built before the conversion all stay valid.

    Args:
        module (nn.Module): the model (or a single layer).
        group (ProcessGroup, optional): the group to synchronize over. Defaults to the world.

    Returns:
        nn.Module: the converted module (``module`` itself, changed in place, unless it is a
        layer that had to be replaced).
    """
    def replace(m):
        if isinstance(m, (SyncSwitchNorm, SyncSparseSwitchNorm2d, SyncSwitchWhiten2d)):
            return m
        if isinstance(m, SparseSwitchNorm2d):
            new = _rebuild(m, SyncSparseSwitchNorm2d, _SSN_ARGS, group=group)
        elif isinstance(m, _SwitchNorm):
            new = _rebuild(m, SyncSwitchNorm, _SN_ARGS, group=group)
        elif isinstance(m, SwitchWhiten2d):
            new = _rebuild(m, SyncSwitchWhiten2d, _SW_ARGS, group=group)
        else:
            return None
        new._reverted_cls = type(m)
        return new
    return _swap(module, replace)


def revert_sync_sn(module: nn.Module) -> nn.Module:
    """Replaces every SyncSN/SyncSSN/SyncSW layer by the class it was converted from (else
    :class:`SwitchNorm2d`, :class:`SparseSwitchNorm2d`, :class:`SwitchWhiten2d`), keeping
    its parameter and buffer objects as :func:`convert_sync_sn` does."""
    def replace(m):
        if isinstance(m, SyncSparseSwitchNorm2d):
            return _rebuild(m, getattr(m, '_reverted_cls', SparseSwitchNorm2d), _SSN_ARGS)
        if isinstance(m, SyncSwitchNorm):
            return _rebuild(m, getattr(m, '_reverted_cls', SwitchNorm2d), _SN_ARGS)
        if isinstance(m, SyncSwitchWhiten2d):
            return _rebuild(m, getattr(m, '_reverted_cls', SwitchWhiten2d), _SW_ARGS)
        return None
    return _swap(module, replace)
