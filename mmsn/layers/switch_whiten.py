"""Switchable Whitening layers (Pan et al., "Switchable Whitening for Deep Representation
Learning") and their synchronized variant."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import SW_STATISTICS, SWConfig, ratios_of, switch_whiten
from .base import ConfigOption, SwitchableLayer


class SwitchWhiten2d(SwitchableLayer):
    """Switchable Whitening over groups of contiguous channels of ``(N, C, H, W)`` inputs.

    Mixes batch and instance whitening (and, for ``sw_type`` 3 and 5, standardization)
    statistics with learned softmax ratios, then whitens each group of ``num_pergroup``
    channels by the inverse square root of the mixed covariance (SW paper Eqn. 5-7).

    Args:
        num_features (int): channels ``C``, a multiple of ``num_pergroup``.
        num_pergroup (int): channels per whitening group. Defaults to 16.
        sw_type (int): 2 = {BW, IW}, 3 = {BW, IW, LN}, 5 = {BW, IW, BN, IN, LN}. Defaults to 2.
        T (int): Newton iterations. Defaults to 5.
        tie_weight (bool): use the mean ratios for the covariance too (no
            ``sw_var_weight``). Defaults to False.
        eps (float): added to the diagonal of the mixed covariance. Defaults to 1e-5.
        momentum (float, optional): running-statistics momentum in PyTorch's convention;
            None for a cumulative average. Defaults to 0.1.
        affine (bool): learn a per-channel scale and shift. Defaults to True.
        method (str): inverse square root by 'newton' (the paper's, default) or exactly by
            'eigh' (for analysis and tests).
    """

    _abbr_ = 'sw'
    _input_dims = (4,)
    _input_layout = '(N, C, H, W)'
    num_pergroup = ConfigOption(fixed=True)
    sw_type = ConfigOption(fixed=True)
    T = ConfigOption()
    method = ConfigOption()

    def __init__(self, num_features: int, num_pergroup: int = 16, sw_type: int = 2, T: int = 5,
                 tie_weight: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, method: str = 'newton'):
        config = SWConfig(num_pergroup=num_pergroup, sw_type=sw_type, T=T, momentum=momentum,
                          eps=eps, method=method)
        super().__init__(num_features, affine, config)
        if num_features % num_pergroup:
            raise ValueError(f'num_pergroup: expected a divisor of num_features={num_features}, '
                             f'got {num_pergroup}')
        self.num_groups = num_features // num_pergroup
        self.tie_weight = bool(tie_weight)
        self.sw_mean_weight = nn.Parameter(torch.ones(sw_type))
        if self.tie_weight:
            self.register_parameter('sw_var_weight', None)
        else:
            self.sw_var_weight = nn.Parameter(torch.ones(sw_type))
        self.register_buffer('running_mean', torch.zeros(self.num_groups, num_pergroup, 1))
        self.register_buffer('running_cov',
                             torch.eye(num_pergroup).repeat(self.num_groups, 1, 1))

    @property
    def statistics(self) -> Tuple[str, ...]:
        """The mixed statistics, in the order of the ratio vectors."""
        return SW_STATISTICS[self.sw_type]

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_cov.copy_(torch.eye(self.num_pergroup).expand_as(self.running_cov))
        self.num_batches_tracked.zero_()

    def ratios(self) -> Tuple[Tensor, Tensor]:
        """Mean and covariance ratios (softmax of the logits), at least float32."""
        mean_ratio = ratios_of(self.sw_mean_weight, True)
        if self.tie_weight:
            return mean_ratio, mean_ratio
        return mean_ratio, ratios_of(self.sw_var_weight, True)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        var_logits = self.sw_mean_weight if self.tie_weight else self.sw_var_weight
        return switch_whiten(
            x, self.sw_mean_weight, var_logits, self.weight, self.bias, self.running_mean,
            self.running_cov, self.num_batches_tracked, self.config,
            use_batch_stats=self.use_batch_stats(), sync=self.sync_group())

    def extra_repr(self) -> str:
        return (f'{self.num_features}, num_pergroup={self.num_pergroup}, sw_type={self.sw_type}, '
                f'T={self.T}, tie_weight={self.tie_weight}, eps={self.eps}, '
                f'momentum={self.momentum}, affine={self.affine}, method={self.method!r}')


class SyncSwitchWhiten2d(SwitchWhiten2d):
    """SW whose BW mean and covariance come from the whole batch across processes.

    Count-weighted merge over ``group`` (exact for unequal and empty per-rank batches), one
    all-gather in forward and one all-reduce in backward; IW/IN/LN stay per sample. Falls
    back to SW without an initialised process group or with one process.

    Args:
        group (ProcessGroup, optional): the group to synchronize over. Defaults to the world.
        **kwargs: as for :class:`SwitchWhiten2d`.
    """

    synchronized = True

    def __init__(self, num_features: int, num_pergroup: int = 16, sw_type: int = 2, T: int = 5,
                 tie_weight: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, method: str = 'newton', group: Optional[object] = None):
        super().__init__(num_features, num_pergroup, sw_type, T, tie_weight, eps, momentum,
                         affine, method)
        self.group = group
