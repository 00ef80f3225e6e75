"""Sparse Switchable Normalization (Shao et al., "SSN: Learning Sparse Switchable
Normalization via SparsestMax", CVPR 2019)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.sparsestmax import sparsestmax
from .switch_norm import SwitchNorm2d


class SparseSwitchNorm2d(SwitchNorm2d):
    """SN whose ratios come from sparsestmax instead of softmax: the closest point of the
    simplex at least ``radius`` from its centre, so ratios become exactly sparse and, as the
    radius grows to 1 during training (``SSNRadiusHook``), one-hot.

    Buffers as in the SSN release: ``radius``; ``mean_fixed`` / ``var_fixed`` (0/1) mark
    ratios that reached one-hot and were frozen, after which ``mean_weight`` /
    ``var_weight`` hold those PROBABILITIES rather than logits.

    Args:
        As :class:`SwitchNorm2d` (always with the BN branch: sparsestmax takes 3 ratios).
    """

    _abbr_ = 'sn'
    _mixes_logits = False  # (sparsestmax has no kernel: the op gets the ratios)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 last_gamma: bool = False):
        super().__init__(num_features, eps, momentum, affine, True, last_gamma)
        self.register_buffer('mean_fixed', torch.zeros(1, dtype=torch.long))
        self.register_buffer('var_fixed', torch.zeros(1, dtype=torch.long))
        self.register_buffer('radius', torch.zeros(1))

    def _ratio(self, logits: Tensor, fixed: Tensor) -> Tensor:
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if bool(fixed.item()):
            return logits.detach()  # frozen one-hot probabilities: no gradient
        return sparsestmax(logits, float(self.radius.item()))

    def ratios(self) -> Tuple[Tensor, Tensor]:
        """Mean and variance ratios (sparsestmax at the current radius, or the fixed ones)."""
        return (self._ratio(self.mean_weight, self.mean_fixed),
                self._ratio(self.var_weight, self.var_fixed))

    def ratio_inputs(self) -> Tuple[Tensor, Tensor]:
        """The ratios themselves (sparsestmax has no kernel)."""
        return self.ratios()

    @torch.no_grad()
    def fix_one_hot(self, tolerance: float = 1e-6) -> Tuple[bool, bool]:
        """Freezes every ratio vector that is one-hot, storing its probabilities (as the
        release does). Returns whether the mean and the variance ratios are fixed."""
        for logits, fixed in ((self.mean_weight, self.mean_fixed),
                              (self.var_weight, self.var_fixed)):
            if fixed.item():
                continue
            ratio = self._ratio(logits, fixed)
            if ratio.max() >= 1 - tolerance:
                logits.copy_(torch.nn.functional.one_hot(ratio.argmax(), 3).to(logits.dtype))
                fixed.fill_(1)
        return bool(self.mean_fixed.item()), bool(self.var_fixed.item())

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, radius={float(self.radius):.3f}, '
                f'fixed=({int(self.mean_fixed)}, {int(self.var_fixed)})')


class SyncSparseSwitchNorm2d(SparseSwitchNorm2d):
    """SSN whose BN branch uses the statistics of the whole batch across processes, as
    :class:`SyncSwitchNorm` does for SN (one all-gather forward, one all-reduce backward;
    without a process group or with one process it computes what SSN computes).

    Args:
        group (ProcessGroup, optional): the group to synchronize over. Defaults to the world.
        **kwargs: as for :class:`SparseSwitchNorm2d`.
    """

    synchronized = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 last_gamma: bool = False, group: Optional[object] = None):
        super().__init__(num_features, eps, momentum, affine, last_gamma)
        self.group = group
