"""The built model after a norm switch (``norm_switch.py``): :func:`check_switched` verifies
that no BatchNorm is left where the switch should have reached, :func:`module_changes` lists
the norm modules that changed, one line per module path."""
import re
from typing import Dict, List

from .config_edits import NormSwitchError

def norm_modules(model) -> Dict[str, str]:
    """``{module path: class name}`` of every normalization layer of ``model``."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from ..layers import SwitchableLayer
    kinds = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
             SwitchableLayer)
    return {name: type(module).__name__ for name, module in model.named_modules()
            if isinstance(module, kinds)}


_NORM_NAME = re.compile(r'(^|\.)(?:bn|sn|ssn|sw|gn|ln|in|norm)(\d*)$')


def _slot(path: str) -> str:
    """A norm's place independent of the abbreviation its type gives its name
    (``layer1.0.bn1`` and ``layer1.0.sn1`` are the same slot)."""
    return _NORM_NAME.sub(r'\1norm\2', path)


def module_changes(before, after) -> List[str]:
    """One line per norm module that changed between two builds of a model
    (``path: old type -> new type``, the path as in ``after``); GN layers whose group count
    is not 32 say so."""
    old = {_slot(path): kind for path, kind in norm_modules(before).items()}
    modules = dict(after.named_modules())
    lines, seen = [], set()
    for path, kind in norm_modules(after).items():
        seen.add(_slot(path))
        if old.get(_slot(path)) == kind:
            continue
        line = f'{path}: {old.get(_slot(path), "none")} -> {kind}'
        groups = getattr(modules[path], 'num_groups', None)
        if groups is not None and groups != getattr(modules[path], 'preferred_groups', groups):
            line += f' ({groups} groups for {modules[path].num_channels} channels)'
        lines.append(line)
    lines += [f'{slot}: {kind} -> none' for slot, kind in old.items() if slot not in seen]
    return lines


def check_switched(model, norm: str) -> None:
    """Raises :class:`NormSwitchError` when BatchNorm layers remain in a model switched to
    SN, SyncSN or GN (a module that builds its norms without the config's ``norm_cfg``)."""
    if norm not in ('SN', 'SyncSN', 'GN'):
        return
    left = [path for path, kind in norm_modules(model).items() if 'BatchNorm' in kind]
    if left:
        raise NormSwitchError(f'--norm {norm}: {len(left)} BatchNorm layers are built without '
                              f'the config\'s norm_cfg and would stay BatchNorm: '
                              f'{", ".join(left[:8])}' + (' ...' if len(left) > 8 else ''))
