"""Switch the normalization of any mmdet / mmseg config (``tools/train.py --norm``).

:func:`switch_config_norm` rewrites a loaded ``Config`` in place: every BatchNorm-family
``norm_cfg`` of the model (backbone, neck, heads, auxiliary heads; values inherited from
``_base_`` files are already merged into the model dict when the config is loaded) becomes
the chosen norm, upstream's frozen-BN setup becomes what SN needs (``norm_eval=False``,
trainable norms, no weight decay on norm parameters), heads without norms get one only
when asked, and the backbone's pretrained weights are pointed at a converted checkpoint or
dropped on request (``backbone_weights.py``). It returns a report of every change and
every thing left alone (``config_edits.py``); it raises :class:`NormSwitchError`, before
anything is trained, where it cannot rewrite the model safely. :func:`check_switched` then
verifies the built model (no BatchNorm left where the switch should have reached), and
:func:`module_changes` lists the norm modules that changed, one line per module path (both
in ``norm_check.py``).
"""
import copy
import importlib
import inspect
from typing import Optional

from .backbone_weights import set_backbone_weights
from .config_edits import NormSwitchError, NormSwitchReport, train_norms, walk

#: what ``--norm`` takes
NORM_CHOICES = ('BN', 'SyncBN', 'GN', 'SN', 'SyncSN', 'SW', 'SyncSW')
#: the BatchNorm family as mmcv, mmdet and mmseg name it in configs
BN_TYPES = frozenset({'BN', 'BN1d', 'BN2d', 'BN3d', 'SyncBN', 'MMSyncBN', 'NaiveSyncBN',
                      'naiveSyncBN'})
#: ResNet backbones SW can be placed in (``SWResNet`` builds mmdet's / mmseg's ResNet)
SW_BACKBONES = ('ResNet',)
#: box heads without norms, and their norm-carrying variant (``--norm-heads``)
NORM_HEAD_VARIANTS = {'Shared2FCBBoxHead': 'Shared4Conv1FCBBoxHead'}
_LEARNED = ('GN', 'SN', 'SyncSN', 'SW', 'SyncSW')   # norms trained, not frozen


def _describe(norm_cfg) -> str:
    return 'none' if norm_cfg is None else str(norm_cfg.get('type'))


def _registry(cfg):
    """The MODELS registry of the config's scope (mmdet or mmseg), its modules registered."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise NormSwitchError(f'default_scope: expected an mmdet or mmseg config, got '
                              f'{scope!r}')
    importlib.import_module(f'{scope}.models')
    from .backbones import register_backbones
    register_backbones(scope)
    return importlib.import_module(f'{scope}.registry').MODELS


def _norm_argument(registry, type_name):
    """``(takes_norm_cfg, default)`` of the registered class: whether its ``__init__`` (or a
    base's, through ``**kwargs``) takes ``norm_cfg``, and the default it gives it. None for
    a type that is not a registered class."""
    if not isinstance(type_name, str):
        return None
    try:
        cls = registry.get(type_name)
    except Exception:  # (a scope whose package is not installed)
        return None
    if cls is None or not inspect.isclass(cls):
        return None
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if 'norm_cfg' in params:
            default = params['norm_cfg'].default
            return True, None if default is inspect.Parameter.empty else default
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return False, None


def _is_component(path: str) -> bool:
    """Whether the dict at ``path`` is a model component that the registry builds (the
    backbone, a neck, a head), not an argument its parent completes (e.g. ``upsample_cfg``,
    to which the parent passes its own ``norm_cfg``)."""
    key = next(part for part in reversed(path.split('.')) if not part.isdigit())
    return key in ('backbone', 'neck') or key.endswith('head')


def _norm_of(registry, node: dict, path: str):
    """The ``norm_cfg`` a config dict builds with (its own, or for a component its class's
    default), and whether its class takes one at all (None: unknown)."""
    argument = _norm_argument(registry, node.get('type'))
    if 'norm_cfg' in node:
        return True if argument is None else argument[0], node['norm_cfg']
    if argument is None or not _is_component(path):
        return None, None
    return argument


#: the dimension suffix of the BatchNorm types that have one
_BN_DIMENSION = {'BN1d': '1d', 'BN3d': '3d'}


def target_norm_cfg(norm: str, old: Optional[dict] = None) -> dict:
    """The ``norm_cfg`` that replaces ``old`` for ``--norm norm``: always trainable, with
    ``old``'s eps and momentum (its other options too for the BN baselines) and its
    dimension (``BN1d`` -> ``SN1d``)."""
    if norm not in NORM_CHOICES:
        raise ValueError(f'norm: expected one of {NORM_CHOICES}, got {norm!r}')
    old = dict(old or {})
    kind = old.pop('type', 'BN')
    old.pop('requires_grad', None)
    dimension = _BN_DIMENSION.get(kind, '')
    if dimension and norm not in ('BN', 'SN', 'SyncBN', 'GN'):  # (the last two: any dims)
        raise NormSwitchError(f'--norm {norm}: a {kind} layer has no {norm} counterpart '
                              f'(SN has SN{dimension}, BN has {kind})')
    if norm == 'GN':
        kept = {k: v for k, v in old.items() if k == 'eps'}
        return dict(type='AutoGN', num_groups=32, requires_grad=True, **kept)
    if norm in ('BN', 'SyncBN'):
        return dict(old, type=f'BN{dimension}' if norm == 'BN' and dimension else norm,
                    requires_grad=True)
    kept = {k: v for k, v in old.items() if k in ('eps', 'momentum')}
    return dict(type=f'{norm}{dimension}', requires_grad=True, **kept)


def switch_config_norm(cfg, norm: str, heads: bool = False, pretrained: str = 'auto',
                       sw_layers: str = 'imagenet',
                       work_dir: Optional[str] = None) -> NormSwitchReport:
    """Rewrites ``cfg`` (an mmengine ``Config`` of an mmdet or mmseg model) in place.

    Args:
        cfg: the loaded config.
        norm (str): one of ``NORM_CHOICES``. BN and SyncBN both become ``norm`` (SN:
            'SN', SyncSN: 'SyncSN', GN: ``AutoGN`` with 32 groups or the largest divisor
            of the width below 32); SW/SyncSW replace the norms of the ResNet backbone at
            ``sw_layers`` (``SWResNet``) and leave the other norms as they are.
        heads (bool): give heads and necks that have no norm one (``Shared2FCBBoxHead``
            becomes ``Shared4Conv1FCBBoxHead``).
        pretrained (str): 'auto' (SN/SW: the upstream BN ImageNet checkpoint converted
            through ``sn2mm``'s BN path, from the local cache; BN/SyncBN: unchanged),
            'none' (train from scratch) or the path of a converted checkpoint.
        sw_layers (str): SW placement ('imagenet' or 'segmentation', see SWResNet).
        work_dir (str, optional): where converted checkpoints go (default: the config's
            work_dir).

    Returns:
        NormSwitchReport: every change and every thing left alone.

    Raises:
        NormSwitchError: the model cannot be switched safely (nothing to switch, a backbone
        without a ``norm_cfg`` argument, SW on a non-ResNet backbone, pretrained weights
        that are needed but cannot be found or converted).
    """
    if norm not in NORM_CHOICES:
        raise ValueError(f'norm: expected one of {NORM_CHOICES}, got {norm!r}')
    saved = {key: copy.deepcopy(cfg[key]) for key in ('model', 'optim_wrapper') if key in cfg}
    try:
        return _switch(cfg, norm, heads, pretrained, sw_layers, work_dir)
    except NormSwitchError:
        for key, value in saved.items():  # never a half-switched config
            cfg[key] = value
        raise


def _switch(cfg, norm, heads, pretrained, sw_layers, work_dir) -> NormSwitchReport:
    registry = _registry(cfg)
    model = cfg.model
    report = NormSwitchReport(norm)
    backbone = model.get('backbone')
    if norm in ('SW', 'SyncSW'):
        _place_whitening(backbone, norm, sw_layers, report)
    else:
        _switch_norm_cfgs(model, registry, norm, report)
    if norm in _LEARNED:
        train_norms(model, report)
        _no_norm_decay(cfg, report)
    if heads:
        _add_head_norms(model, registry, norm, report)
    else:
        for path, node in walk(model, 'model'):
            if path.startswith('model.backbone'):
                continue
            takes, norm_cfg = _norm_of(registry, node, path)
            if node.get('type') in NORM_HEAD_VARIANTS or (takes and norm_cfg is None):
                report.notes.append(f'{path} ({node["type"]}) has no norm: left so '
                                    '(--norm-heads adds one)')
    set_backbone_weights(cfg, norm, pretrained, sw_layers, work_dir, report)
    return report


def _switch_norm_cfgs(model, registry, norm: str, report: NormSwitchReport) -> None:
    backbone = model.get('backbone')
    if backbone is not None:
        takes, _ = _norm_of(registry, backbone, 'model.backbone')
        if takes is None:
            raise NormSwitchError(
                f'model.backbone: type {backbone.get("type")!r} is unknown to the '
                f'{registry.scope} registry here, so whether its norms follow norm_cfg '
                'cannot be told')
        if takes is False:
            raise NormSwitchError(
                f'model.backbone ({backbone.get("type")}) takes no norm_cfg argument: its '
                f'norms cannot be switched to {norm} from the config')
    switched = 0
    for path, node in walk(model, 'model'):
        takes, norm_cfg = _norm_of(registry, node, path)
        if not takes or not isinstance(norm_cfg, dict):
            continue
        kind = norm_cfg.get('type')
        if kind in BN_TYPES:
            default = '' if 'norm_cfg' in node else ' (its default)'
            node['norm_cfg'] = target_norm_cfg(norm, norm_cfg)
            report.changes.append((f'{path}.norm_cfg', _describe(norm_cfg) + default,
                                   _describe(node['norm_cfg'])))
            switched += 1
        else:
            report.notes.append(f'{path}.norm_cfg ({kind}) is not a BatchNorm: left alone')
    if norm == 'GN' and switched:
        report.notes.append('GN: 32 groups per layer, or the largest divisor of its width '
                            'below 32 where 32 does not divide it (listed when built)')
    if not switched:
        raise NormSwitchError(f'--norm {norm}: the model has no BatchNorm-family norm_cfg '
                              '(nothing to switch)')


def _place_whitening(backbone, norm: str, sw_layers: str, report: NormSwitchReport) -> None:
    kind = None if backbone is None else backbone.get('type')
    if kind not in SW_BACKBONES or backbone.get('deep_stem'):
        raise NormSwitchError(
            f'--norm {norm}: SW goes into a ResNet backbone at a named placement (SWResNet); '
            f'model.backbone is {kind!r}' + (' with a deep stem' if kind in SW_BACKBONES else ''))
    backbone['type'] = 'SWResNet'
    backbone['sw_cfg'] = dict(type=norm, sw_type=2, num_pergroup=16)
    backbone['sw_layers'] = sw_layers
    norm_cfg = backbone.get('norm_cfg') or dict(type='BN')
    backbone['norm_cfg'] = dict(norm_cfg, requires_grad=True)
    report.changes.append(('model.backbone.type', kind, f'SWResNet (sw_layers={sw_layers!r}, '
                           f'{norm} with sw_type=2, 16 channels per group)'))
    report.notes.append(f'the other norms keep {_describe(norm_cfg)}, trainable')


def _no_norm_decay(cfg, report: NormSwitchReport) -> None:
    wrapper = cfg.get('optim_wrapper')
    if wrapper is None:
        return
    paramwise = wrapper.get('paramwise_cfg') or {}
    old = paramwise.get('norm_decay_mult')
    if old != 0:
        wrapper['paramwise_cfg'] = dict(paramwise, norm_decay_mult=0.0)
        report.changes.append(('optim_wrapper.paramwise_cfg.norm_decay_mult', str(old), '0.0'))


def _add_head_norms(model, registry, norm: str, report: NormSwitchReport) -> None:
    head_cfg = target_norm_cfg('SN' if norm in ('SW', 'SyncSW') else norm)
    if norm == 'SyncSW':
        head_cfg = target_norm_cfg('SyncSN')
    for path, node in walk(model, 'model'):
        if path.startswith('model.backbone'):
            continue
        if node.get('type') in NORM_HEAD_VARIANTS:
            old = node['type']
            node['type'] = NORM_HEAD_VARIANTS[old]
            report.changes.append((f'{path}.type', old, node['type']))
        takes, norm_cfg = _norm_of(registry, node, path)
        if takes and norm_cfg is None:
            node['norm_cfg'] = copy.deepcopy(head_cfg)
            report.changes.append((f'{path}.norm_cfg ({node["type"]})', 'none',
                                   _describe(head_cfg)))
