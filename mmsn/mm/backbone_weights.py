"""Where a switched backbone's weights come from (``--pretrained``): the upstream BN
checkpoint converted for the new norms (``auto``), a converted file the user names, or none
(``--no-pretrained``: trained from scratch, nothing frozen)."""
import os
import os.path as osp
from typing import Optional
from urllib.parse import urlparse

from .config_edits import NormSwitchError, NormSwitchReport, train_norms


def _checkpoint_url(spec: str) -> str:
    """The http(s) URL behind mmengine's ``torchvision://`` / ``open-mmlab://`` names."""
    from mmengine.runner.checkpoint import get_external_models, get_torchvision_models
    if spec.startswith(('torchvision://', 'modelzoo://')):
        try:
            import torchvision  # noqa: F401  (mmengine reads its URL table)
        except ImportError:
            raise NormSwitchError(f'pretrained: {spec!r} names a torchvision model, and '
                                  'torchvision is not installed') from None
    for prefix, table in (('torchvision://', get_torchvision_models),
                          ('open-mmlab://', get_external_models),
                          ('openmmlab://', get_external_models)):
        if spec.startswith(prefix):
            urls = table()
            name = spec[len(prefix):]
            if name not in urls:
                raise NormSwitchError(f'pretrained: mmengine knows no {spec!r}')
            return urls[name]
    return spec


def local_checkpoint(spec: str) -> str:
    """Where ``spec`` (a path, an URL or an mmengine model name) is on this machine: the
    file itself, or torch's hub cache, where mmengine downloads it."""
    url = _checkpoint_url(spec)
    if not url.startswith(('http://', 'https://')):
        return url
    import torch
    return osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(url).path))


def set_backbone_weights(cfg, norm: str, pretrained: str, sw_layers: str,
                         work_dir: Optional[str], report: NormSwitchReport) -> None:
    """Points the backbone of ``cfg`` (switched to ``norm``) at its weights.

    Args:
        pretrained (str): 'auto' (the upstream checkpoint, converted into
            ``{work_dir}/pretrained`` when the backbone's norms changed), 'none' (from
            scratch) or the path of an already converted checkpoint.
        sw_layers (str): the SW placement the conversion uses (SW norms only).

    Raises:
        NormSwitchError: the weights cannot be found or converted; the message says what to
            pass instead.
    """
    model = cfg.model
    backbone = model.get('backbone') or {}
    init_cfg = backbone.get('init_cfg')
    upstream = model.get('pretrained')
    if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
        upstream = init_cfg.get('checkpoint')
    if pretrained == 'none':
        _from_scratch(model, backbone, upstream, report)
        return
    if pretrained != 'auto':  # an already converted checkpoint
        if not osp.isfile(pretrained):
            raise NormSwitchError(f'--pretrained: {pretrained!r} does not exist')
        _point_backbone_at(model, backbone, pretrained, report, str(upstream))
        return
    switched = any(path.startswith('model.backbone.') for path, _, _ in report.changes)
    if norm in ('BN', 'SyncBN') or upstream is None or not switched:
        if upstream is not None and not switched:
            report.notes.append(f'the backbone keeps its norms and its weights ({upstream})')
        return
    needed = ('pass --pretrained FILE (a checkpoint of this backbone with the new norms) or '
              '--no-pretrained to train from scratch')
    if norm == 'GN':
        raise NormSwitchError(f'--norm GN: the backbone starts from {upstream!r}, a BN model, '
                              f'and GN has no conversion from it; {needed}')
    if backbone.get('type') not in ('ResNet', 'SWResNet') or backbone.get('deep_stem'):
        raise NormSwitchError(
            f'--norm {norm}: the backbone ({backbone.get("type")}'
            f'{", deep stem" if backbone.get("deep_stem") else ""}) starts from {upstream!r}; '
            f'the converter takes BN ResNet v1 models with the 7x7 stem only; {needed}')
    source = local_checkpoint(str(upstream))
    if not osp.isfile(source):
        raise NormSwitchError(
            f'--norm {norm}: the backbone starts from {upstream!r}, expected on this machine '
            f'at {source} (run once where it can download, or copy it there); or {needed}')
    from ..converters.resnet import ConversionError, convert_checkpoint
    out_dir = osp.join(work_dir or cfg.get('work_dir') or '.', 'pretrained')
    placement = f'_{sw_layers}' if 'SW' in norm else ''
    target = osp.join(out_dir, f'{osp.splitext(osp.basename(source))[0]}_'
                               f'{norm.lower()}{placement}.pth')
    if not osp.isfile(target):
        os.makedirs(out_dir, exist_ok=True)
        partial = f'{target}.{os.getpid()}'  # (every process converts; one replace wins)
        try:
            convert_checkpoint(source, partial, sw_layers=sw_layers if 'SW' in norm else None,
                               log=lambda line: None)
        except ConversionError as error:
            raise NormSwitchError(f'--norm {norm}: {source} cannot be converted ({error}); '
                                  f'{needed}') from error
        os.replace(partial, target)
    report.notes.append(f'{source} (BN) converted to {target} through sn2mm\'s BN path '
                        '(uniform ratios, BN statistics as the running statistics)')
    _point_backbone_at(model, backbone, target, report, str(upstream))


def _from_scratch(model, backbone, upstream, report: NormSwitchReport) -> None:
    """--no-pretrained: no backbone weights, and nothing frozen that only made sense with
    them (frozen stages, norms in eval mode)."""
    if upstream is not None:
        backbone['init_cfg'] = None
        if model.get('pretrained') is not None:
            model['pretrained'] = None
        report.changes.append(('model.backbone pretrained weights', str(upstream),
                               'none (--no-pretrained: trained from scratch)'))
    if backbone.get('frozen_stages', -1) >= 0:
        report.changes.append(('model.backbone.frozen_stages', str(backbone['frozen_stages']),
                               '-1 (nothing frozen from scratch)'))
        backbone['frozen_stages'] = -1
    train_norms(model, report, ' (from scratch)')


def _point_backbone_at(model, backbone, checkpoint: str, report: NormSwitchReport,
                       old: str) -> None:
    backbone['init_cfg'] = dict(type='StrictPretrained', checkpoint=checkpoint)
    if model.get('pretrained') is not None:
        model['pretrained'] = None
    report.changes.append(('model.backbone.init_cfg', old, f'StrictPretrained({checkpoint})'))
