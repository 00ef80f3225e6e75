"""Hard (one-hot) ratios (SN paper Table 3, Table 11 items 6-7).

``harden_ratios`` (a model, in place) and ``harden_state_dict`` (a checkpoint) turn soft
ratios into their argmax, for finetuning or inference; ``hard_choice`` reads which statistics
a layer with one-hot ratios uses. ``mmsn.deploy`` then rewrites such layers for inference.
"""
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .analysis import ratios_from_state_dict, ssn_ratios
from .layers import ZERO_RATIO_LOGIT, SwitchableLayer

#: logits that end with these names are ratio logits (SN, then SW)
RATIO_LOGITS = ('mean_weight', 'var_weight', 'sw_mean_weight', 'sw_var_weight')


def hard_logits(logits: Tensor) -> Tensor:
    """Logits whose softmax is the one-hot vector of ``logits``'s argmax."""
    hard = torch.full_like(logits, ZERO_RATIO_LOGIT)
    hard[logits.argmax()] = 0
    return hard


def _hardened(layer: str, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The hard versions of one layer's ratio tensors (local names: ``mean_weight``, ...).

    SN and SW: one-hot softmax logits. SSN (it has ``radius``): as the SSN release freezes a
    one-hot ratio, the one-hot PROBABILITIES of the current ratios' argmax with ``*_fixed`` set
    (an already fixed ratio keeps its choice).
    """
    for key in RATIO_LOGITS:
        if key in tensors and not torch.isfinite(tensors[key]).all():
            raise ValueError(f'{layer}: expected finite ratio parameters, got {key} = '
                             f'{tensors[key].tolist()}')
    if 'radius' in tensors:
        hard = {}
        for kind in ('mean', 'var'):
            logits, fixed = tensors[f'{kind}_weight'], tensors[f'{kind}_fixed']
            ratio = ssn_ratios(logits, fixed, tensors['radius'])
            hard[f'{kind}_weight'] = F.one_hot(ratio.argmax(), logits.numel()).to(logits)
            hard[f'{kind}_fixed'] = torch.ones_like(fixed)
        return hard
    return {key: hard_logits(tensors[key]) for key in RATIO_LOGITS
            if key in tensors and tensors[key].dim() == 1}


def _is_one_hot(ratio, tolerance: float = 1e-6) -> bool:
    """Whether ``ratio`` is a one-hot distribution to within ``tolerance``: one entry near 1
    is not enough (SSN stores probabilities: [1, 0.7, 0] is not a choice of the first)."""
    values = torch.as_tensor(ratio, dtype=torch.float64)
    return bool(torch.isfinite(values).all() and values.max() >= 1 - tolerance
                and values.min() >= -tolerance and abs(float(values.sum()) - 1) <= tolerance)


def _check_one_hot(layer: str, ratios: Dict[str, Sequence[float]], tolerance: float = 1e-6):
    for kind in ('mean', 'var'):
        values = torch.as_tensor(ratios[kind], dtype=torch.float64)
        if not _is_one_hot(values, tolerance):
            raise ValueError(f'{layer}: expected one-hot {kind} ratios after hardening, got '
                             f'{values.tolist()}')


def harden_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A copy of a state dict with every SN/SSN/SW layer's ratios made one-hot (argmax per
    layer, for the mean and the variance separately; see :func:`_hardened`). One-hot softmax
    logits get exactly zero gradient, so finetuning keeps them hard.

    Raises:
        ValueError: a layer's ratios are not finite, or not one-hot afterwards.
    """
    hard = OrderedDict(state_dict)
    for layer in ratios_from_state_dict(state_dict):
        prefix = f'{layer}.' if layer else ''  # '' for a single layer's state dict
        local = {k[len(prefix):]: v for k, v in state_dict.items()
                 if k.startswith(prefix) and '.' not in k[len(prefix):]}
        hard.update((k if not layer else f'{layer}.{k}', v)
                    for k, v in _hardened(layer, local).items())
    for layer, ratios in ratios_from_state_dict(hard).items():
        _check_one_hot(layer, ratios)
    return hard


@torch.no_grad()
def harden_ratios(model: nn.Module) -> Dict[str, Tuple[str, str]]:
    """Makes the ratios of every SN/SSN/SW layer of ``model`` one-hot, in place (as
    :func:`harden_state_dict`).

    Returns:
        dict: ``{layer: (mean statistic, variance statistic)}``.

    Raises:
        ValueError: a layer's ratios are not finite, or not one-hot afterwards.
    """
    choices = OrderedDict()
    for name, module in model.named_modules():
        if not isinstance(module, SwitchableLayer):
            continue
        local = dict(module.named_parameters(recurse=False))
        local.update(module.named_buffers(recurse=False))
        for key, value in _hardened(name, local).items():
            local[key].copy_(value)
        choices[name] = hard_choice(module)  # raises for ratios that are not finite
        if choices[name] is None:
            mean, var = module.ratios()
            raise ValueError(f'{name}: expected one-hot ratios after hardening, got mean '
                             f'{mean.tolist()} and variance {var.tolist()}')
    return choices


def hard_choice(layer: SwitchableLayer, tolerance: float = 1e-6) -> Optional[Tuple[str, str]]:
    """(mean statistic, variance statistic) of a layer whose ratios are one-hot, else None."""
    mean, var = layer.ratios()
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError(f'{type(layer).__name__}: expected finite ratios, got mean '
                         f'{mean.tolist()} and variance {var.tolist()}')  # argmax of NaN lies
    if not (_is_one_hot(mean.detach(), tolerance) and _is_one_hot(var.detach(), tolerance)):
        return None
    return layer.statistics[int(mean.argmax())], layer.statistics[int(var.argmax())]

