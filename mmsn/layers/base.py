"""What SN and SW layers share: argument checks, input checks, affine parameters, buffers."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops.distributed import default_group

#: the ratio logit of a statistic a layer must not use (hard ratios, converted sparse ratios):
#: its softmax weight underflows to exactly 0 in every float dtype, and so does its gradient.
ZERO_RATIO_LOGIT = -1e4


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name}: expected a positive int, got {value!r}')
    return value


def check_momentum(momentum: Optional[float]) -> Optional[float]:
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f'momentum: expected a float in [0, 1] or None (cumulative average), '
                         f'got {momentum!r}')
    return None if momentum is None else float(momentum)


def check_eps(eps: float) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f'eps: expected a positive float, got {eps!r}')
    return float(eps)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Ratios are computed in float32 for half-precision parameters, float64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class SwitchableLayer(nn.Module):
    """Base of the SN and SW layers.

    Holds the per-channel affine parameters and the batch counter, checks inputs, and
    migrates checkpoints that lack ``num_batches_tracked`` (the authors' releases have none).
    Subclasses set ``_input_dims`` (the accepted ``x.dim()`` values) and implement
    ``ratios()``, which returns the normalised mean and variance ratios.
    """

    _input_dims: Sequence[int] = (4,)
    _input_layout = '(N, C, H, W)'
    #: the synchronized variants pool the batch statistics over ``self.group`` (or the world)
    synchronized = False
    group: Optional[object] = None

    def __init__(self, num_features: int, eps: float, momentum: Optional[float], affine: bool):
        super().__init__()
        self.num_features = check_positive_int('num_features', num_features)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter('weight', None)
            self.register_parameter('bias', None)
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def check_input(self, x: Tensor) -> None:
        """Raises ValueError for a wrong number of dims, channel count or dtype."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise ValueError(f'input: expected a Tensor for {name}, got {type(x).__name__}')
        if x.dim() not in self._input_dims:
            dims = ' or '.join(f'{d}-D' for d in self._input_dims)
            raise ValueError(f'input: expected a {dims} {self._input_layout} tensor for {name}, '
                             f'got a {x.dim()}-D tensor of shape {tuple(x.shape)}')
        if x.shape[1] != self.num_features:
            raise ValueError(f'input: expected {self.num_features} channels (dim 1) for {name}, '
                             f'got {x.shape[1]} in shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise ValueError(f'input: expected a floating-point tensor for {name}, got {x.dtype}')

    def use_batch_stats(self) -> bool:
        return self.training

    def sync_group(self) -> Optional[object]:
        """The op's ``sync``: the process group whose whole batch the batch statistics pool
        (a synchronized layer's ``group``, or the world once torch.distributed is
        initialised), or None for this process's batch."""
        if not self.synchronized:
            return None
        return self.group if self.group is not None else default_group()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + 'num_batches_tracked'
        if key not in state_dict:
            # Older checkpoints and the authors' releases have no counter: start at zero.
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
