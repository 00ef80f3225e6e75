"""What SN and SW layers share: the op config, input checks, affine parameters, buffers."""
import dataclasses
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops.configs import SNConfig, SWConfig, check_positive_int
from ..ops.distributed import default_group

#: the ratio logit of a statistic a layer must not use (hard ratios, converted sparse ratios):
#: its softmax weight underflows to exactly 0 in every float dtype, and so does its gradient.
ZERO_RATIO_LOGIT = -1e4


class ConfigOption:
    """A layer option whose one home is the layer's frozen op ``config``: reading it reads
    the config; setting it (``layer.momentum = None``) replaces the config with a checked
    copy. ``fixed`` options size the layer's buffers and cannot change after it is built."""

    def __init__(self, fixed: bool = False):
        self.fixed = fixed

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer.config, self.name)

    def __set__(self, layer, value):
        if self.fixed:
            raise AttributeError(f'{self.name}: fixed when the layer is built (the buffers are '
                                 f'sized by it), got an assignment of {value!r}')
        layer.config = dataclasses.replace(layer.config, **{self.name: value})


class SwitchableLayer(nn.Module):
    """Base of the SN and SW layers.

    Holds the op's frozen ``config`` (built once, by the subclass, with the layer; ``eps``
    and ``momentum`` read and replace it), the per-channel affine parameters and the batch
    counter, checks inputs, and migrates checkpoints that lack ``num_batches_tracked`` (the
    authors' releases have none). Subclasses set ``_input_dims`` (the accepted ``x.dim()``
    values) and implement ``ratios()``, which returns the normalised mean and variance
    ratios.
    """

    _input_dims: Sequence[int] = (4,)
    _input_layout = '(N, C, H, W)'
    #: the synchronized variants pool the batch statistics over ``self.group`` (or the world)
    synchronized = False
    group: Optional[object] = None
    eps = ConfigOption()
    momentum = ConfigOption()

    def __init__(self, num_features: int, affine: bool, config: Union[SNConfig, SWConfig]):
        super().__init__()
        self.num_features = check_positive_int('num_features', num_features)
        self.config = config
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
