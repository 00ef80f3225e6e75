"""What the layers learned: their ratios, read from a model or a checkpoint's state dict."""
from collections import OrderedDict
from typing import Dict, Mapping

import torch
import torch.nn.functional as F

from .layers import SN_STATISTICS
from .ops import SW_STATISTICS
from .ops.sparsestmax import sparsestmax


def ssn_ratios(logits: torch.Tensor, fixed: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Ratios of an SSN layer from its tensors: once fixed the release stores
    probabilities, else logits that sparsestmax maps to ratios at the current radius."""
    if bool(fixed.reshape(-1)[0]):
        return logits.double()
    return sparsestmax(logits.double(), float(radius.reshape(-1)[0]))

#: (mean logits key, variance logits key) of each layer kind, as in the authors' releases.
_LOGIT_KEYS = (('mean_weight', 'var_weight'), ('sw_mean_weight', 'sw_var_weight'))


def ratios_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, dict]:
    """Softmax ratios of every SN/SW layer of a state dict, in layer order.

    Returns:
        dict: ``{layer_name: {'statistics': [...], 'mean': [...], 'var': [...]}}``. SW layers
        with ``tie_weight`` report the mean ratios for both.
    """
    layers = OrderedDict()
    for key, value in state_dict.items():
        for mean_key, var_key in _LOGIT_KEYS:
            if not (key == mean_key or key.endswith('.' + mean_key)):
                continue
            prefix = key[:-len(mean_key) - 1]  # '' for a single layer's state dict
            at = (lambda name: f'{prefix}.{name}') if prefix else (lambda name: name)  # noqa: E731
            var_logits = state_dict.get(at(var_key), value)
            if mean_key == 'mean_weight':
                names = SN_STATISTICS[:value.numel()]
            else:
                names = SW_STATISTICS[value.numel()]
            if at('radius') in state_dict:  # SSN: sparsestmax, or fixed probabilities
                radius = state_dict[at('radius')]
                mean = ssn_ratios(value, state_dict[at('mean_fixed')], radius)
                var = ssn_ratios(var_logits, state_dict[at('var_fixed')], radius)
            else:
                mean, var = F.softmax(value.double(), 0), F.softmax(var_logits.double(), 0)
            layers[prefix] = dict(statistics=list(names), mean=mean.tolist(), var=var.tolist())
    return layers


def format_ratio_table(ratios: Dict[str, dict], max_rows: int = 0,
                       divergence: bool = False) -> str:
    """A text table: one row per layer, mean and variance ratios per statistic, and with
    ``divergence`` the symmetric KL between them (:func:`symmetric_kl`)."""
    lines = [f'{"layer":<44} {"mean ratios":<30} {"var ratios":<30}' + (' D' if divergence
                                                                      else '')]
    rows = list(ratios.items())
    if max_rows and len(rows) > max_rows:
        rows = rows[:max_rows // 2] + [('...', None)] + rows[-(max_rows - max_rows // 2):]
    for name, entry in rows:
        if entry is None:
            lines.append('...')
            continue
        fmt = lambda values: ' '.join(f'{s}={v:.2f}' for s, v in zip(entry['statistics'], values))  # noqa: E731
        line = f'{name:<44} {fmt(entry["mean"]):<30} {fmt(entry["var"]):<30}'
        if divergence:
            line += f' {symmetric_kl(entry["mean"], entry["var"]):.3f}'
        lines.append(line.rstrip())
    return '\n'.join(lines)


def model_ratios(model: torch.nn.Module) -> Dict[str, dict]:
    """Ratios of every SN/SW layer of a model (DDP wrappers unwrapped), in module order."""
    from .layers import SwitchableLayer
    model = getattr(model, 'module', model)
    layers = OrderedDict()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SwitchableLayer):
                mean, var = module.ratios()
                layers[name] = dict(statistics=list(module.statistics), mean=mean.tolist(),
                                    var=var.tolist())
    return layers


def ratio_scalars(ratios: Dict[str, dict], prefix: str = 'ratios') -> Dict[str, float]:
    """Flat scalars ``{prefix}/{layer}/{mean|var}_{statistic}`` for the visualizer."""
    scalars = {}
    for layer, entry in ratios.items():
        for kind in ('mean', 'var'):
            for statistic, value in zip(entry['statistics'], entry[kind]):
                scalars[f'{prefix}/{layer}/{kind}_{statistic}'] = float(value)
    return scalars


def symmetric_kl(p, q, floor: float = 1e-8) -> float:
    """D = KL(p||q) + KL(q||p) of two ratio vectors (SN paper Fig. 7c); zeros floored."""
    p = torch.as_tensor(p, dtype=torch.float64).clamp(min=floor)
    q = torch.as_tensor(q, dtype=torch.float64).clamp(min=floor)
    return float(((p - q) * (p.log() - q.log())).sum())


def ratio_history(scalar_files, prefix: str = 'ratios') -> Dict[str, Dict[str, list]]:
    """Ratio curves from mmengine ``vis_data/scalars.json`` files (one JSON record per line),
    given in the order of their runs: ``{layer: {'step': [...], 'mean_in': [...], ...}}``,
    every series as long as ``step``.

    A later run of the same work dir supersedes what the earlier ones logged from its first
    step on: a resumed run repeats the steps after its checkpoint, and a fresh run (``make
    demo`` again) starts over. Of two records of one step in a run, the later one counts.
    """
    import json
    history = OrderedDict()
    for path in scalar_files:
        run = OrderedDict()
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                for key, value in record.items():
                    if not key.startswith(prefix + '/'):
                        continue
                    layer, series = key[len(prefix) + 1:].rsplit('/', 1)
                    curves = run.setdefault(layer, OrderedDict(step=[]))
                    if not curves['step'] or curves['step'][-1] != record['step']:
                        curves['step'].append(record['step'])
                    values = curves.setdefault(series, [])
                    if len(values) == len(curves['step']):  # this step has a value already
                        values[-1] = value
                    else:
                        values.append(value)
        for layer, curves in run.items():
            kept = history.setdefault(layer, OrderedDict(step=[]))
            before = sum(1 for step in kept['step'] if step < curves['step'][0])
            for values in kept.values():
                del values[before:]
            for series, values in curves.items():
                kept.setdefault(series, []).extend(values)
    return history
