"""Deployment of layers with hard (one-hot) ratios (SN paper Table 11 items 6-7).

``deploy_hard_switchable`` rewrites an eval model (ratios made one-hot by
:func:`mmsn.hard_ratios.harden_ratios`): an SN layer that picks BN for both the mean and the
variance is a per-channel affine map and folds into the preceding convolution; one that
picks IN or LN keeps only the statistics it uses. An SW layer that takes its mean and
covariance from the batch statistics (BW or BN) is a fixed block-diagonal linear map in
eval, and folds into the preceding convolution too (or becomes a grouped 1x1 convolution).
"""
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hard_ratios import hard_choice
from .layers import SwitchableLayer
from .layers.switch_norm import _SwitchNorm
from .layers.switch_whiten import SwitchWhiten2d
from .ops.reference import switch_whiten_coefficients


class HardSwitchNorm(nn.Module):
    """Inference form of an SN layer with one-hot ratios: computes only the chosen mean
    ('in', 'ln' or 'bn' = running) and variance, in float32, for ``(N, C, *)`` inputs.

    Args:
        layer (SwitchNorm1d/2d/3d, SyncSwitchNorm): the trained layer (affine and running
            buffers are copied).
        mean_from, var_from (str): the chosen statistics.
    """

    def __init__(self, layer: _SwitchNorm, mean_from: str, var_from: str):
        super().__init__()
        self.mean_from, self.var_from, self.eps = mean_from, var_from, layer.eps
        self.register_buffer('weight', None if layer.weight is None else layer.weight.detach()
                             .clone())
        self.register_buffer('bias', None if layer.bias is None else layer.bias.detach().clone())
        uses_bn = 'bn' in (mean_from, var_from)
        self.register_buffer('running_mean', layer.running_mean.clone() if uses_bn else None)
        self.register_buffer('running_var', layer.running_var.clone() if uses_bn else None)

    def _statistic(self, x: Tensor, source: str, running: Optional[Tensor], var: bool) -> Tensor:
        if source == 'bn':
            return _per_channel(running, x)
        dims = tuple(range(2 if source == 'in' else 1, x.dim()))
        if var:
            return x.var(dims, unbiased=False, keepdim=True)
        return x.mean(dims, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        mean = self._statistic(y, self.mean_from, self.running_mean, var=False)
        var = self._statistic(y, self.var_from, self.running_var, var=True)
        y = (y - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * _per_channel(self.weight, y) + _per_channel(self.bias, y)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f'mean_from={self.mean_from!r}, var_from={self.var_from!r}, eps={self.eps}'


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape((1, -1) + (1,) * (like.dim() - 2)).to(like.dtype)


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: a BN/BN layer with no convolution to fold into."""

    def __init__(self, scale: Tensor, shift: Tensor):
        super().__init__()
        self.register_buffer('scale', scale.detach().clone())
        self.register_buffer('shift', shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * _per_channel(self.scale, x) + _per_channel(self.shift, x)


def _bn_affine(layer: _SwitchNorm) -> Tuple[Tensor, Tensor]:
    scale = torch.rsqrt(layer.running_var.float() + layer.eps)
    shift = -layer.running_mean.float() * scale
    if layer.weight is not None:
        weight = layer.weight.float()
        scale, shift = scale * weight, shift * weight + layer.bias.float()
    return scale, shift


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, scale: Tensor, shift: Tensor) -> None:
    dtype = conv.weight.dtype  # products in float32, rounded once to the conv's dtype
    scale_shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.copy_((conv.weight.float() * scale.reshape(scale_shape)).to(dtype))
    bias = shift if conv.bias is None else conv.bias.float() * scale + shift
    conv.bias = nn.Parameter(bias.to(dtype))


#: SW statistics taken from the running (batch) moments in eval
_BATCH_STATISTICS = ('bw', 'bn')


def _whitening_map(layer: SwitchWhiten2d) -> Tuple[Tensor, Tensor]:
    """``(B, offset)`` with ``y = B x + offset`` for an eval SW layer whose mean and
    covariance come from its running moments: ``B`` ``(C, C)`` block-diagonal (one
    ``diag(gamma) S^{-1/2}`` block per group, by the layer's own method and T), in float64."""
    groups, c = layer.num_groups, layer.num_pergroup
    # exact one-hot ratios of the choice: a layer counts as hard with ratios within 1e-6 of
    # one-hot (peaked logits, not only hardened ones), and the rest must not leak into the map
    mean_ratio, var_ratio = (F.one_hot(ratio.argmax(), ratio.numel()).to(torch.float64)
                             for ratio in layer.ratios())
    # zero IW moments of one sample: with one-hot ratios on BW/BN they do not enter
    zeros = layer.running_mean.new_zeros((1, groups, c), dtype=torch.float64)
    weight = None if layer.weight is None else layer.weight.double()
    bias = None if layer.bias is None else layer.bias.double()
    matrix, centre, shift = switch_whiten_coefficients(
        zeros, zeros[..., None] * zeros[..., None, :], 1, mean_ratio,
        var_ratio, weight, bias, layer.running_mean, layer.running_cov, None,
        False, layer.sw_type, layer.T, None, layer.eps, layer.method)
    matrix, centre, shift = matrix[0], centre[0], shift[0]
    offset = shift - (matrix @ centre[..., None]).squeeze(-1)
    return torch.block_diag(*matrix), offset.reshape(-1)


@torch.no_grad()
def _fold_linear_into_conv(conv: nn.Conv2d, matrix: Tensor, offset: Tensor) -> None:
    """``conv`` followed by ``y = matrix x + offset`` over its output channels, as one conv."""
    dtype = conv.weight.dtype
    weight = matrix @ conv.weight.double().reshape(conv.out_channels, -1)
    conv.weight.copy_(weight.reshape(conv.weight.shape).to(dtype))
    bias = offset if conv.bias is None else matrix @ conv.bias.double() + offset
    conv.bias = nn.Parameter(bias.to(dtype))


def _grouped_conv(matrix: Tensor, offset: Tensor, groups: int, like: Tensor) -> nn.Conv2d:
    """``y = matrix x + offset`` (block-diagonal ``matrix``) as a grouped 1x1 convolution."""
    channels = offset.numel()
    c = channels // groups
    conv = nn.Conv2d(channels, channels, 1, groups=groups).to(like.device, like.dtype)
    blocks = torch.stack([matrix[g * c:(g + 1) * c, g * c:(g + 1) * c] for g in range(groups)])
    conv.weight.data.copy_(blocks.reshape(channels, c, 1, 1))
    conv.bias.data.copy_(offset)
    return conv


def _foldable_conv_types() -> Tuple[type, ...]:
    """Convolutions whose output is exactly ``conv(x, weight) + bias`` of their parameters.

    An exact-type list, not ``isinstance``: subclasses such as mmcv's ``ConvWS2d``,
    ``ConvAWS2d`` and ``SAConv2d`` rewrite their weight in ``forward``, so a weight folded
    into them would be rewritten too (silently wrong outputs). mmcv's ``Conv2d``/``Conv3d``
    wrappers only add empty-input handling, so they fold.
    """
    types = [nn.Conv1d, nn.Conv2d, nn.Conv3d]
    try:
        from mmcv.cnn.bricks import wrappers
    except ImportError:  # mmcv is optional for the layers and their deployment
        return tuple(types)
    return tuple(types + [getattr(wrappers, name) for name in ('Conv2d', 'Conv3d')
                          if hasattr(wrappers, name)])


def _can_fold(previous: Optional[nn.Module], channels: int) -> bool:
    """A plain convolution right before the layer, with its channels (fuse_conv_bn's rule,
    narrowed to convolutions that use their weight as it is: no forward pre-hook such as
    ``weight_norm``/``spectral_norm``, which rebuild the weight each call)."""
    return (type(previous) in _foldable_conv_types() and not previous._forward_pre_hooks
            and isinstance(previous.weight, nn.Parameter) and previous.groups == 1
            and previous.out_channels == channels)


def _norm_runs_before_conv(parent: nn.Module) -> bool:
    """mmcv's ``ConvModule`` registers its conv before its norm whatever its ``order``; with
    ``order=('norm', 'conv', 'act')`` the norm is applied first and must not fold into it."""
    order = getattr(parent, 'order', None)
    return (isinstance(order, tuple) and 'norm' in order and 'conv' in order
            and order.index('norm') < order.index('conv'))


@torch.no_grad()
def deploy_hard_switchable(model: nn.Module) -> Dict[str, str]:
    """Rewrites the SN and SW layers with one-hot ratios of an eval ``model``, in place.

    SN: BN/BN layers right after a plain, ungrouped convolution (in their parent's child
    order, as mmcv's ``fuse_conv_bn`` assumes, except in a ``ConvModule`` whose ``order``
    puts the norm first) are folded into it and become ``nn.Identity``; other BN/BN
    layers become :class:`ChannelAffine`; the rest :class:`HardSwitchNorm`. SW (and SyncSW)
    layers whose mean and covariance both come from the batch statistics (BW or BN, i.e.
    the running moments in eval) are folded the same way, or become a grouped 1x1
    ``nn.Conv2d``. Layers with soft ratios and SW layers that pick IW, IN or LN (per-sample
    whitening has no fixed form) are left as they are.

    Returns:
        dict: ``{layer: what it became}``.

    Raises:
        ValueError: the model or a switchable layer in it is in training mode, or a layer's
            ratios are not finite (nothing is rewritten then).
    """
    done = OrderedDict()

    def visit(parent: nn.Module, prefix: str) -> None:
        previous = None
        for name, child in list(parent.named_children()):
            path = f'{prefix}{name}'
            choice = choices.get(child)
            if isinstance(child, SwitchWhiten2d):
                if choice is not None and set(choice) <= set(_BATCH_STATISTICS):
                    matrix, offset = _whitening_map(child)
                    if _can_fold(previous, child.num_features):
                        _fold_linear_into_conv(previous, matrix, offset)
                        setattr(parent, name, nn.Identity())
                        done[path] = 'folded into the preceding conv'
                    else:
                        like = child.running_cov if child.weight is None else child.weight
                        setattr(parent, name, _grouped_conv(matrix, offset, child.num_groups,
                                                            like))
                        done[path] = 'grouped 1x1 conv'
            elif choice is not None:
                if choice == ('bn', 'bn') and child.using_bn:
                    scale, shift = _bn_affine(child)
                    if _can_fold(previous, scale.numel()):
                        _fold_into_conv(previous, scale, shift)
                        setattr(parent, name, nn.Identity())
                        done[path] = 'folded into the preceding conv'
                    else:
                        setattr(parent, name, ChannelAffine(scale, shift))
                        done[path] = 'per-channel affine'
                else:
                    setattr(parent, name, HardSwitchNorm(child, *choice))
                    done[path] = f'mean from {choice[0].upper()}, variance from {choice[1].upper()}'
            else:
                visit(child, f'{path}.')
            previous = None if _norm_runs_before_conv(parent) else child
    training = [name or '(the model)' for name, module in model.named_modules()
                if module.training and (module is model or isinstance(module, SwitchableLayer))]
    if training:
        raise ValueError('model: expected a model in eval mode (deployment folds running '
                         f'statistics), got these modules in training mode: {training}')
    choices = {}  # every layer checked before anything is rewritten
    for name, module in model.named_modules():
        if isinstance(module, (_SwitchNorm, SwitchWhiten2d)):
            try:
                choices[module] = hard_choice(module)
            except ValueError as error:
                raise ValueError(f'{name}: {error}') from None
    visit(model, '')
    return done
