"""What a config rewrite records, and the edits that the norm switch
(``norm_switch.py``) and the choice of the backbone's weights (``backbone_weights.py``)
both make."""
import dataclasses
from typing import Iterator, List, Tuple


class NormSwitchError(ValueError):
    """The config cannot be switched safely; nothing should be trained from it."""


@dataclasses.dataclass
class NormSwitchReport:
    """What :func:`~mmsn.mm.norm_switch.switch_config_norm` did: ``changes`` as (config
    path, old, new) and ``notes`` for what it decided or left alone."""
    norm: str
    changes: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def lines(self) -> List[str]:
        return ([f'--norm {self.norm}:'] + [f'  {path}: {old} -> {new}'
                                             for path, old, new in self.changes]
                + [f'  note: {note}' for note in self.notes])


def walk(node, path: str) -> Iterator[Tuple[str, dict]]:
    """Every dict under ``node`` (depth first) with its dotted path."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from walk(value, f'{path}.{index}')


def train_norms(model, report: NormSwitchReport, why: str = '') -> None:
    """``norm_eval=False`` wherever a component keeps its norms in eval mode."""
    for path, node in walk(model, 'model'):
        if node.get('norm_eval'):
            node['norm_eval'] = False
            report.changes.append((f'{path}.norm_eval', 'True', f'False{why}'))
