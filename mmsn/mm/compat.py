"""Fixes for the places in OpenMMLab that special-case ``_BatchNorm``.

Each fix is narrow: it changes how one check sees SN/SW layers and nothing else, and applying
it twice changes nothing.
"""
import importlib
import importlib.util
import sys
import warnings
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
        try:
            importlib.import_module(package_name)
        except ImportError as err:  # installed but unusable here: nothing of it can be built
            warnings.warn(f'mmsn: {package_name} could not be imported ({err}); its norm_eval '
                          f'will not freeze SN/SW layers')
            continue
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


def _numpy_safe_globals() -> list:
    import numpy as np
    allowed = [np.dtype, np.ndarray]
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                            np.int32, np.uint8, np.bool_)]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return allowed + [scalar, _reconstruct]


def load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local-file checkpoint loader, working under torch >= 2.6.

    torch >= 2.6 loads with ``weights_only=True`` by default; mmengine 0.10.7 stores numpy
    scalars in ``meta`` and ``HistoryBuffer`` objects in ``message_hub`` (mmengine issue
    #1655), so its own checkpoints fail to load. Numpy scalars and arrays are allowed as safe
    types; a file that still needs more (a resumable training checkpoint) is loaded with
    ``weights_only=False``, which is what torch < 2.6 always did, with a warning that names it.
    """
    import os.path as osp
    import pickle
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split('WeightsUnpickler error:')[-1].strip().split('.')[0]
        warnings.warn(f'mmsn: loading {filename} with weights_only=False ({reason}); '
                      f'load only checkpoints you trust')
        return torch.load(filename, map_location=map_location, weights_only=False)


def allow_mmengine_checkpoints() -> bool:
    """Installs :func:`load_local_checkpoint` as mmengine's loader for local files.

    Returns:
        bool: whether it was installed (mmengine present and torch has ``safe_globals``).
    """
    if not hasattr(torch.serialization, 'safe_globals'):
        return False  # torch < 2.5 loads with weights_only=False anyway
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return False
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
    return True
