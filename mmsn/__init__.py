"""mmsn: Switchable Normalization and Switchable Whitening for dense prediction.

The layers need torch alone. With mmengine installed, importing mmsn also registers them for
OpenMMLab configs (``norm_cfg=dict(type='SN')``) and applies the fixes of ``mmsn.mm``.
"""
import importlib.util

from .layers import (SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d,
                     SwitchWhiten2d, SyncSparseSwitchNorm2d, SyncSwitchNorm, SyncSwitchWhiten2d,
                     convert_sync_sn, revert_sync_sn)
from .version import __version__

if importlib.util.find_spec('mmengine') is not None:
    from .mm import setup_openmmlab
    setup_openmmlab()

__all__ = [
    'SparseSwitchNorm2d', 'SyncSparseSwitchNorm2d', 'SwitchNorm1d', 'SwitchNorm2d',
    'SwitchNorm3d', 'SyncSwitchNorm', 'SwitchWhiten2d', 'SyncSwitchWhiten2d', 'convert_sync_sn',
    'revert_sync_sn', '__version__'
]
