"""GroupNorm for ``norm_cfg`` of any channel count (the GN baseline of the norm switch)."""
from torch import nn


def group_count(num_channels: int, preferred: int = 32) -> int:
    """``preferred`` groups when they divide ``num_channels``, else the largest divisor of
    ``num_channels`` not above it (GN paper: 32 groups)."""
    if num_channels < 1:
        raise ValueError(f'num_channels: expected a positive int, got {num_channels!r}')
    return next(g for g in range(min(preferred, num_channels), 0, -1) if num_channels % g == 0)


class AdaptiveGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with ``num_groups`` chosen per layer by :func:`group_count`, so one
    ``norm_cfg=dict(type='AutoGN')`` serves layers of any width (mmcv's ``GN`` needs one
    ``num_groups`` that divides every width).

    Args:
        num_features (int): channels.
        num_groups (int): preferred group count. Defaults to 32.
        eps (float): as ``nn.GroupNorm``. affine (bool): as ``nn.GroupNorm``.
    """

    _abbr_ = 'gn'

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True):
        self.preferred_groups = num_groups
        super().__init__(group_count(num_features, num_groups), num_features, eps, affine)
