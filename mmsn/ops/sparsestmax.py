"""Sparsemax and sparsestmax over three ratios (SSN, Shao et al., CVPR 2019)."""
import math

import torch
from torch import Tensor


def sparsemax(logits: Tensor) -> Tensor:
    """Euclidean projection of a 1-D vector onto the probability simplex."""
    ordered, _ = torch.sort(logits, descending=True)
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, logits.numel() + 1, dtype=logits.dtype, device=logits.device)
    support = ordered - cumulative / ranks > 0
    size = int(support.sum())
    threshold = cumulative[size - 1] / size
    return (logits - threshold).clamp(min=0)


def sparsestmax(logits: Tensor, radius: float) -> Tensor:
    """Sparsestmax of three logits: the closest point of the simplex at distance at least
    ``radius`` from its centre (radius 0: sparsemax; radius >= sqrt(2/3): one-hot).

    Follows the SSN release (its 1e-6 in the rescaling included), so that converted SSN
    checkpoints keep their ratios, except at the centre (see below).
    """
    if logits.dim() != 1 or logits.numel() != 3:
        raise ValueError(f'logits: expected a vector of 3 ratio logits, got shape '
                         f'{tuple(logits.shape)}')
    radius = float(radius)
    projected = sparsemax(logits)
    centre = 1.0 / 3
    distance = (projected - centre).square().sum().sqrt()
    if distance >= radius:
        return projected
    if distance < 1e-6:
        # At the centre (uniform logits, the initialisation) no direction is preferred; the
        # release divides ~0 by 1e-6 there and returns ratios that do not sum to one. Move
        # towards the vertex of the first largest logit instead (one-hot at radius sqrt(2/3)).
        vertex = torch.zeros_like(projected)
        vertex[logits.argmax()] = 1.0
        step = min(radius / math.sqrt(2.0 / 3), 1.0)
        return projected + step * (vertex - projected)
    ratios = radius * (projected - centre) / (distance + 1e-6) + centre
    order = torch.argsort(logits, descending=True)
    if ratios[order[2]] < 0:
        # The circle leaves the simplex: the answer lies on the edge of the two largest
        # logits, at distance ``radius`` from the centre (the edge is 1/sqrt(6) away).
        half_chord = math.sqrt(2.0) * math.sqrt(max(radius ** 2 - 1.0 / 6, 0.0))
        ratios = torch.zeros_like(ratios)
        ratios[order[0]] = (1 + half_chord) / 2
        ratios[order[1]] = (1 - half_chord) / 2
    return ratios.clamp(0, 1)
