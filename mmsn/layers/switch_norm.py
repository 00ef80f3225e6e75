"""Switchable Normalization layers (Luo et al., "Differentiable Learning-to-Normalize via
Switchable Normalization") and their synchronized variant."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import SNConfig, ratios_of, switch_norm
from .base import SwitchableLayer

#: Names of the statistics mixed by SN, in the order of ``mean_weight`` and ``var_weight``.
SN_STATISTICS = ('in', 'ln', 'bn')


class _SwitchNorm(SwitchableLayer):
    """Switchable Normalization over the spatial dims of ``(N, C, *)`` inputs.

    Mixes instance-, layer- and batch-norm statistics with learned softmax ratios, one set
    for means and one for variances (SN paper Eqn. 3-5).

    Args:
        num_features (int): channels ``C``.
        eps (float): added to the mixed variance. Defaults to 1e-5.
        momentum (float, optional): running-statistics momentum in PyTorch's convention
            (``running = (1 - m) * running + m * batch``); None for a cumulative average, as
            the paper's batch-average inference uses. Defaults to 0.1.
        affine (bool): learn a per-channel scale and shift. Defaults to True.
        using_bn (bool): include the BN branch; False gives IN+LN only (for one sample per
            GPU) with 2-entry ratios and no running buffers. Defaults to True.
        last_gamma (bool): initialise the scale to zero (the last norm of a residual block).
            Defaults to False.
    """

    _abbr_ = 'sn'
    #: the op mixes with the ratio logits (``config.logits``); SSN hands it ratios
    _mixes_logits = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, using_bn: bool = True, last_gamma: bool = False):
        config = SNConfig(momentum=momentum, eps=eps, logits=self._mixes_logits)
        super().__init__(num_features, affine, config)
        self.using_bn = bool(using_bn)
        self.last_gamma = bool(last_gamma)
        num_statistics = 3 if self.using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(num_statistics))
        self.var_weight = nn.Parameter(torch.ones(num_statistics))
        if self.using_bn:
            self.register_buffer('running_mean', torch.zeros(num_features))
            self.register_buffer('running_var', torch.ones(num_features))
        else:
            self.register_buffer('running_mean', None)
            self.register_buffer('running_var', None)
        self.reset_parameters()

    @property
    def statistics(self) -> Tuple[str, ...]:
        """The mixed statistics, in the order of the ratio vectors."""
        return SN_STATISTICS if self.using_bn else SN_STATISTICS[:2]

    def reset_running_stats(self) -> None:
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
            nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def ratios(self) -> Tuple[Tensor, Tensor]:
        """Mean and variance ratios (softmax of the logits), at least float32."""
        return ratios_of(self.mean_weight, True), ratios_of(self.var_weight, True)

    def ratio_inputs(self) -> Tuple[Tensor, Tensor]:
        """What the op mixes with: the logits (the op applies the softmax itself)."""
        return self.mean_weight, self.var_weight

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        mean_weight, var_weight = self.ratio_inputs()
        return switch_norm(
            x, mean_weight, var_weight, self.weight, self.bias, self.running_mean,
            self.running_var, self.num_batches_tracked, self.config,
            use_batch_stats=self.use_batch_stats(), sync=self.sync_group())

    def extra_repr(self) -> str:
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, '
                f'affine={self.affine}, using_bn={self.using_bn}, last_gamma={self.last_gamma}')


class SwitchNorm1d(_SwitchNorm):
    """SN for ``(N, C)`` or ``(N, C, L)`` inputs. On ``(N, C)`` each instance is one
    value, so the IN branch has zero variance and the learned ratios move away from it."""
    _input_dims = (2, 3)
    _input_layout = '(N, C) or (N, C, L)'


class SwitchNorm2d(_SwitchNorm):
    """SN for ``(N, C, H, W)`` inputs (NCHW or channels_last)."""
    _input_dims = (4,)
    _input_layout = '(N, C, H, W)'


class SwitchNorm3d(_SwitchNorm):
    """SN for ``(N, C, T, H, W)`` inputs."""
    _input_dims = (5,)
    _input_layout = '(N, C, T, H, W)'


class SyncSwitchNorm(_SwitchNorm):
    """SN whose BN branch uses the statistics of the whole batch across processes.

    The batch moments are merged over ``group`` weighted by each rank's element count, so
    unequal or empty per-rank batches give exactly the statistics of the concatenated batch;
    IN and LN stay per sample. Forward costs one all-gather of ``2C + 1`` floats a process
    (count, means, M2), backward one all-reduce: of the BN moments' gradients (``2C``
    floats) on the kernels, of the gathered parts' (``world x (2C + 1)``) on the reference.
    Without an initialised process group, or with one process, it computes exactly what SN
    computes.

    Args:
        group (ProcessGroup, optional): the group to synchronize over. Defaults to the world.
        **kwargs: as for :class:`SwitchNorm2d`.
    """

    synchronized = True

    _input_dims = (2, 3, 4, 5)
    _input_layout = '(N, C, *)'

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, using_bn: bool = True, last_gamma: bool = False,
                 group: Optional[object] = None):
        super().__init__(num_features, eps, momentum, affine, using_bn, last_gamma)
        self.group = group
