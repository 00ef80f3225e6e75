"""Registration of the layers in mmengine's root MODELS registry."""
from ..layers import (SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchWhiten2d,
                      SyncSparseSwitchNorm2d, SyncSwitchNorm, SyncSwitchWhiten2d)
from ..layers.group_norm import AdaptiveGroupNorm

#: Config type names, as mmcv names BN ('BN' = 'BN2d', 'BN1d', 'BN3d', 'SyncBN').
LAYER_NAMES = {
    'SN': SwitchNorm2d,
    'SN1d': SwitchNorm1d,
    'SN2d': SwitchNorm2d,
    'SN3d': SwitchNorm3d,
    'SyncSN': SyncSwitchNorm,
    'SSN': SparseSwitchNorm2d,
    'SyncSSN': SyncSparseSwitchNorm2d,
    'SW': SwitchWhiten2d,
    'SyncSW': SyncSwitchWhiten2d,
    'AutoGN': AdaptiveGroupNorm,  # GN with a group count per layer (the norm switch's GN)
}


def register_layers() -> None:
    """Registers every name of ``LAYER_NAMES`` in the root MODELS (skips names already ours)."""
    from mmengine.registry import MODELS
    for name, cls in LAYER_NAMES.items():
        registered = MODELS.module_dict.get(name)
        if registered is cls:
            continue
        if registered is not None:
            raise KeyError(f'{name} is already registered in MODELS as {registered!r}; '
                           f'mmsn cannot register {cls.__name__} under that name')
        MODELS.register_module(name=name, module=cls)
