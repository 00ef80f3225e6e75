"""nn.Module layers: parameters, buffers and input checks; the maths lives in ``mmsn.ops``."""
from .base import ZERO_RATIO_LOGIT, SwitchableLayer
from .convert import convert_sync_sn, revert_sync_sn
from .sparse_switch_norm import SparseSwitchNorm2d, SyncSparseSwitchNorm2d
from .switch_norm import SN_STATISTICS, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm
from .switch_whiten import SwitchWhiten2d, SyncSwitchWhiten2d

__all__ = [
    'SwitchableLayer', 'SwitchNorm1d', 'SwitchNorm2d', 'SwitchNorm3d', 'SyncSwitchNorm',
    'SwitchWhiten2d', 'SyncSwitchWhiten2d', 'SparseSwitchNorm2d', 'SyncSparseSwitchNorm2d', 'convert_sync_sn',
    'revert_sync_sn', 'SN_STATISTICS', 'ZERO_RATIO_LOGIT'
]
