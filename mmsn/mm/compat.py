"""Fixes for the places in OpenMMLab that special-case ``_BatchNorm``.

Each fix is narrow: it changes how one check sees SN/SW layers and nothing else, and applying
it twice changes nothing.
"""
import importlib
import importlib.util
import sys
from functools import wraps

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import SwitchableLayer

#: Packages whose modules may define backbones or heads with a ``norm_eval`` option.
NORM_EVAL_PACKAGES = ('mmdet.models', 'mmseg.models')


def _freezes_switchable_layers(train):
    """Wraps a ``train(mode)`` that puts ``_BatchNorm`` in eval under ``self.norm_eval`` so
    that it does the same for SN/SW layers."""

    @wraps(train)
    def wrapped(self, mode: bool = True):
        result = train(self, mode)
        if mode and getattr(self, 'norm_eval', False):
            for module in self.modules():
                if isinstance(module, SwitchableLayer):
                    module.eval()
        return result

    wrapped._mmsn_norm_eval = True
    return wrapped


def patch_norm_eval(packages=NORM_EVAL_PACKAGES) -> list:
    """Makes ``norm_eval`` freeze SN/SW layers in every class of ``packages`` whose own
    ``train`` reads ``self.norm_eval`` (mmdet/mmseg ResNet, ResNeXt, HRNet, ResLayer, ...).

    Packages that are not installed are skipped.

    Returns:
        list[type]: the classes patched by this call.
    """
    patched = []
    for package_name in packages:
        if importlib.util.find_spec(package_name.split('.')[0]) is None:
            continue
        importlib.import_module(package_name)
        # The modules the package itself imports: those are the ones a config can build.
        modules = [m for name, m in list(sys.modules.items())
                   if m is not None and (name == package_name or name.startswith(package_name + '.'))]
        for module in modules:
            for obj in list(vars(module).values()):
                if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
                    continue
                train = obj.__dict__.get('train')
                if (train is None or getattr(train, '_mmsn_norm_eval', False)
                        or 'norm_eval' not in train.__code__.co_names):
                    continue
                obj.train = _freezes_switchable_layers(train)
                patched.append(obj)
    return patched


def patch_norm_decay() -> bool:
    """Makes mmengine's ``DefaultOptimWrapperConstructor`` count SN/SW layers as norm layers,
    so ``paramwise_cfg=dict(norm_decay_mult=0.)`` removes weight decay from their scale,
    shift and ratio logits, as the papers train detection and segmentation.

    Returns:
        bool: whether mmengine was found.
    """
    try:
        from mmengine.optim.optimizer import default_constructor
    except ImportError:
        return False
    # The constructor's only use of this name is its `is_norm` isinstance check.
    current = default_constructor._BatchNorm
    if not (isinstance(current, tuple) and SwitchableLayer in current):
        default_constructor._BatchNorm = (_BatchNorm, SwitchableLayer)
    return True


def allow_mmengine_checkpoints() -> None:
    """Allows what mmengine writes into checkpoints under ``torch.load(weights_only=True)``.

    torch >= 2.6 loads with ``weights_only=True`` by default; mmengine 0.10.7 stores numpy
    scalars and its ``HistoryBuffer`` in the checkpoint's meta and message hub, so loading its
    own checkpoints fails (mmengine issue #1655). Only these types are allowed, not arbitrary
    pickles.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return
    import numpy as np
    allowed = [np.dtype, np.ndarray, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
               type(np.dtype(np.int64)), type(np.dtype(np.int32)), type(np.dtype(np.bool_))]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    allowed += [scalar, _reconstruct]
    try:
        from mmengine.logging import HistoryBuffer
        allowed.append(HistoryBuffer)
    except ImportError:
        pass
    add_safe_globals(allowed)
