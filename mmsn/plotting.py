"""The papers' pictures of what SN/SW layers learned (SN Fig. 5, 7, 12; SW Fig. 6)."""
import os
import os.path as osp
from typing import Dict, List

from .analysis import symmetric_kl

#: colours per statistic, the same in every figure
COLOURS = {'in': '#4c72b0', 'ln': '#55a868', 'bn': '#c44e52', 'bw': '#8172b2', 'iw': '#ccb974'}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(figure, out_dir: str, name: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [osp.join(out_dir, f'{name}.{ext}') for ext in ('png', 'svg')]
    for path in paths:
        figure.savefig(path, dpi=120, bbox_inches='tight')
    _pyplot().close(figure)
    return paths


def plot_layer_ratios(ratios: Dict[str, dict], out_dir: str, name: str = 'ratios') -> List[str]:
    """Stacked bars of the mean and the variance ratios of every layer, in layer order."""
    plt = _pyplot()
    layers = list(ratios)
    figure, axes = plt.subplots(2, 1, figsize=(max(6, 0.22 * len(layers) + 2), 6), sharex=True)
    for axis, kind in zip(axes, ('mean', 'var')):
        bottom = [0.0] * len(layers)
        statistics = []
        for entry in ratios.values():
            statistics += [s for s in entry['statistics'] if s not in statistics]
        for statistic in statistics:
            values = [entry[kind][entry['statistics'].index(statistic)]
                      if statistic in entry['statistics'] else 0.0 for entry in ratios.values()]
            axis.bar(range(len(layers)), values, bottom=bottom, label=statistic.upper(),
                     color=COLOURS.get(statistic), width=0.85)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set_ylim(0, 1)
        axis.set_ylabel(f'{kind} ratios')
        axis.legend(loc='upper right', fontsize=7, ncol=len(statistics))
    axes[-1].set_xticks(range(len(layers)))
    axes[-1].set_xticklabels(layers, rotation=90, fontsize=5)
    axes[-1].set_xlabel('layer (network order)')
    return _save(figure, out_dir, name)


def plot_divergence(ratios: Dict[str, dict], out_dir: str, name: str = 'divergence') -> List[str]:
    """Per-layer D = KL(mean||var) + KL(var||mean) of the two ratio vectors (SN Fig. 7c)."""
    plt = _pyplot()
    layers = list(ratios)
    values = [symmetric_kl(e['mean'], e['var']) for e in ratios.values()]
    figure, axis = plt.subplots(figsize=(max(6, 0.22 * len(layers) + 2), 3))
    axis.bar(range(len(layers)), values, color='#4c72b0', width=0.85)
    axis.set_ylabel('KL(mean||var) + KL(var||mean)')
    axis.set_xticks(range(len(layers)))
    axis.set_xticklabels(layers, rotation=90, fontsize=5)
    return _save(figure, out_dir, name)


def plot_ratio_curves(history: Dict[str, Dict[str, list]], out_dir: str,
                      name: str = 'ratio_curves', max_layers: int = 12) -> List[str]:
    """Ratios over training iterations for up to ``max_layers`` layers spread over the
    network (SN Fig. 7a-b, SW Fig. 6); one panel per layer, mean solid, variance dashed."""
    plt = _pyplot()
    layers = list(history)
    if len(layers) > max_layers:
        layers = [layers[round(i * (len(layers) - 1) / (max_layers - 1))]
                  for i in range(max_layers)]
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows),
                                squeeze=False, sharey=True)
    for axis, layer in zip(axes.flat, layers):
        curves = history[layer]
        for series, values in curves.items():
            if series == 'step':
                continue
            kind, statistic = series.split('_', 1)
            axis.plot(curves['step'][:len(values)], values, color=COLOURS.get(statistic),
                      linestyle='-' if kind == 'mean' else '--',
                      label=f'{kind} {statistic.upper()}')
        axis.set_title(layer, fontsize=7)
        axis.set_ylim(0, 1)
    for axis in list(axes.flat)[len(layers):]:
        axis.axis('off')
    axes.flat[0].legend(fontsize=6)
    return _save(figure, out_dir, name)
