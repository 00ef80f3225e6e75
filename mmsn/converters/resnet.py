"""ImageNet ResNet checkpoints (the authors' SN, SSN and SW releases; BN models) to the
mmdet / mmseg ``ResNet`` (and ``SWResNet``) with SN / SW layers.

The destination is a backbone that mmdet or mmseg builds; its state dict is the template:
every source tensor goes to one template entry (renamed, reshaped, or folded into ratio
logits) or is dropped with a reason (only the classifier), and every template entry must be
filled. Anything else is an error, and nothing is written.
"""
import os
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..analysis import ssn_ratios
from ..layers import ZERO_RATIO_LOGIT
from ..layers.placement import SW_PLACEMENTS, resolve_placement
from ..version import __version__

#: (blocks per stage, bottleneck) -> depth, for the ResNet v1 depths mmdet and mmseg build.
_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
           ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
_NORM_ABBRS = ('bn', 'sn', 'sw', 'gn', 'ssn')
_STEM_OR_BLOCK_NORM = re.compile(r'^(?:(?P<block>layer\d+\.\d+)\.)?(?P<abbr>[a-z]+)(?P<k>\d)$')
_SHORTCUT_NORM = re.compile(r'^(?P<block>layer\d+\.\d+)\.downsample\.1$')


class ConversionError(ValueError):
    """The source cannot be converted; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__('cannot convert:\n  ' + '\n  '.join(self.problems))


def load_source(path: str, trusted: bool = False) -> Dict[str, Tensor]:
    """Reads a checkpoint file (``weights_only``: see :mod:`mmsn.checkpoint`; ``trusted``
    allows a file that needs more) and returns its state dict, prefixes stripped."""
    from ..checkpoint import (DamagedCheckpointError, UntrustedCheckpointError,
                              load_checkpoint_file)
    if not osp.isfile(path):
        raise ConversionError([f'SRC: {path!r} is not a file'])
    try:
        checkpoint = load_checkpoint_file(path, map_location='cpu', trusted=trusted)
    except (DamagedCheckpointError, UntrustedCheckpointError) as error:
        raise ConversionError([f'SRC: {error}']) from None  # the message says it all
    except Exception as error:  # zip/EOF/unicode errors of arbitrary files
        raise ConversionError([f'SRC: {path!r} is not a PyTorch checkpoint '
                               f'({type(error).__name__}: {error})'])
    return extract_state_dict(checkpoint)


def extract_state_dict(checkpoint) -> Dict[str, Tensor]:
    """The tensors of ``{'state_dict': ...}``, ``{'model': ...}`` or a bare state dict, with
    the ``module.`` (DataParallel) and ``backbone.`` prefixes removed."""
    state = checkpoint
    if isinstance(checkpoint, dict):
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), dict):
                state = checkpoint[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, Tensor) for v in state.values()):
        found = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ConversionError([f'SRC: expected a state dict of tensors (bare, or under '
                               f"'state_dict' / 'model'), found {found}"])
    stripped = OrderedDict()
    for key, value in state.items():
        name = key
        while name.startswith(('module.', 'backbone.')):
            name = name.split('.', 1)[1]
        stripped[name] = value
    return stripped


def norm_slot(module: str) -> Optional[str]:
    """Architecture position of a norm module: 'stem', 'layer1.0.norm2', 'layer1.0.shortcut'."""
    match = _SHORTCUT_NORM.match(module)
    if match:
        return f'{match["block"]}.shortcut'
    match = _STEM_OR_BLOCK_NORM.match(module)
    if match and match['abbr'] in _NORM_ABBRS:
        return f'{match["block"]}.norm{match["k"]}' if match['block'] else 'stem'
    return None


def slot_path(slot: str) -> str:
    """The SWResNet placement path of a slot."""
    if slot == 'stem':
        return 'norm1'
    return slot.replace('.shortcut', '.downsample.1')


def group_modules(state: Dict[str, Tensor]) -> 'OrderedDict[str, Dict[str, Tensor]]':
    modules = OrderedDict()
    for key, value in state.items():
        module, _, name = key.rpartition('.')
        modules.setdefault(module, OrderedDict())[name] = value
    return modules


def layer_kind(params: Dict[str, Tensor]) -> Optional[str]:
    """'SSN', 'SN', 'SW' or 'BN' from a norm module's tensors (None if none of them)."""
    if 'mean_weight' in params:
        return 'SSN' if 'mean_fixed' in params else 'SN'
    if 'sw_mean_weight' in params:
        return 'SW'
    if 'running_mean' in params or 'weight' in params:
        return 'BN'
    return None


def infer_architecture(state: Dict[str, Tensor]) -> Tuple[int, Dict[str, str]]:
    """Depth and per-slot source layer kinds; refuses v2, deep stems and unknown depths."""
    keys = list(state)
    problems = []
    if any(k.startswith(('sn_out.', 'bn_out.')) or re.search(r'downsample\.weight$', k)
           for k in keys):
        problems.append('SRC is a pre-activation (v2) ResNet (found sn_out.*/bn_out.* or a bare '
                        'downsample.weight): mmdet/mmseg ResNets are v1; convert a v1 model')
    if any(k.startswith('stem.') for k in keys):
        problems.append('SRC has a deep stem (stem.*, ResNetV1c/V1d); the released SN/SW models '
                        'have the 7x7 stem that this converter maps')
    if 'conv1.weight' not in state:
        problems.append(f'SRC has no stem conv1.weight: not a torchvision-style ResNet '
                        f'(first keys: {keys[:5]})')
    blocks = {}
    for key in keys:
        match = re.match(r'^layer(\d)\.(\d+)\.', key)
        if match:
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    stage_blocks = tuple(blocks.get(s, 0) for s in range(1, 5))
    bottleneck = any(re.match(r'^layer\d\.\d+\.conv3\.weight$', k) for k in keys)
    depth = _DEPTHS.get((stage_blocks, bottleneck))
    if depth is None and not problems:
        depths = '/'.join(map(str, sorted(set(_DEPTHS.values()))))
        problems.append(f'SRC has {stage_blocks} {"bottleneck" if bottleneck else "basic"} '
                        f'blocks per stage: not a ResNet-{depths}')
    if problems:
        raise ConversionError(problems)
    kinds = OrderedDict()
    for module, params in group_modules(state).items():
        slot = norm_slot(module)
        if slot is not None:
            kinds[slot] = layer_kind(params)
    return depth, kinds


def _reshaped(value: Tensor, like: Tensor) -> Tensor:
    if value.numel() != like.numel():
        raise ValueError(f'expected {like.numel()} values {tuple(like.shape)}, '
                         f'got {tuple(value.shape)}')
    return value.reshape(like.shape).to(like.dtype).clone()


def _ratio_logits(probabilities: Tensor) -> Tensor:
    """Logits whose softmax is ``probabilities`` (which sum to one)."""
    return torch.where(probabilities > 0, probabilities.clamp(min=1e-30).log(),
                       torch.full_like(probabilities, ZERO_RATIO_LOGIT))


def convert_layer(src_kind: str, src: Dict[str, Tensor], dst_kind: str,
                  dst: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Converts one norm layer.

    Returns:
        (tensors by destination name, {source name: (destination name, note)}).
    """
    out, used = OrderedDict(), OrderedDict()
    faithful = {('SN', 'SN'), ('SSN', 'SSN'), ('SSN', 'SN'), ('BN', 'SN'), ('BN', 'BN'),
                ('SW', 'SW'), ('BN', 'SW')}
    if (src_kind, dst_kind) not in faithful:
        raise ValueError(f'a {src_kind} layer has no faithful conversion to {dst_kind}')
    for name in ('weight', 'bias'):
        if name in src:
            out[name], used[name] = _reshaped(src[name], dst[name]), (name, '')
    if 'num_batches_tracked' in dst:
        if 'num_batches_tracked' in src:
            out['num_batches_tracked'] = src['num_batches_tracked'].clone()
            used['num_batches_tracked'] = ('num_batches_tracked', '')
        else:  # the releases have no counter: a fresh one
            out['num_batches_tracked'] = torch.zeros_like(dst['num_batches_tracked'])
    if dst_kind in ('SN', 'SSN', 'BN') and 'running_mean' in src:
        for name in ('running_mean', 'running_var'):
            out[name], used[name] = _reshaped(src[name], dst[name]), (name, '')
    if dst_kind == 'SSN':  # the release's buffers as they are
        for name in ('mean_weight', 'var_weight', 'mean_fixed', 'var_fixed', 'radius'):
            out[name] = _reshaped(src[name], dst[name])
            used[name] = (name, '')
    if dst_kind == 'SN':
        if src_kind == 'BN':  # uniform ratios, as a freshly built SN
            out['mean_weight'] = torch.ones_like(dst['mean_weight'])
            out['var_weight'] = torch.ones_like(dst['var_weight'])
        elif src['mean_weight'].numel() != dst['mean_weight'].numel():
            raise ValueError(f'{src["mean_weight"].numel()}-entry ratios, destination has '
                             f'{dst["mean_weight"].numel()}')
        for name in ('mean_weight', 'var_weight'):
            if src_kind == 'SN':
                out[name], used[name] = _reshaped(src[name], dst[name]), (name, '')
            elif src_kind == 'SSN':
                fixed = src['mean_fixed' if name == 'mean_weight' else 'var_fixed']
                ratios = ssn_ratios(src[name], fixed, src['radius'])
                out[name] = _ratio_logits(ratios).to(dst[name].dtype)
                used[name] = (name, 'the SSN ratios, as softmax logits')
        if src_kind == 'SSN':
            for name in ('mean_fixed', 'var_fixed', 'radius'):
                used[name] = ('mean_weight,var_weight', 'folded into the ratio logits')
    if dst_kind == 'SW':
        groups, num_pergroup = dst['running_cov'].shape[:2]
        if src_kind == 'SW':
            for name in ('sw_mean_weight', 'sw_var_weight', 'running_mean', 'running_cov'):
                if name in src:  # a stride-0 running_cov of early releases is copied dense
                    out[name] = _reshaped(src[name].contiguous(), dst[name])
                    used[name] = (name, '')
        else:  # BN -> SW: batch statistics on the diagonal, uniform ratios
            out['running_mean'] = _reshaped(src['running_mean'], dst['running_mean'])
            out['running_cov'] = torch.diag_embed(
                src['running_var'].reshape(groups, num_pergroup)).to(dst['running_cov'].dtype)
            used['running_mean'] = ('running_mean', 'BN statistics; uniform SW ratios')
            used['running_var'] = ('running_cov', 'on the diagonal')
            for name in ('sw_mean_weight', 'sw_var_weight'):
                if name in dst:
                    out[name] = torch.ones_like(dst[name])
    return out, used


def _destination_config(depth: int, src_kinds: Dict[str, str],
                        sw_layers: Optional[Union[str, Sequence[str]]], sw_type: int,
                        num_pergroup: int, state: Dict[str, Tensor], ssn_as_sn: bool) -> dict:
    kinds = set(src_kinds.values())
    sn_kinds = kinds & {'SN', 'SSN'}
    sw_state = {}
    if 'SW' in kinds:
        sw_params = next(m for m, p in group_modules(state).items() if 'sw_mean_weight' in p)
        sw_state = group_modules(state)[sw_params]
        sw_type = sw_state['sw_mean_weight'].numel()
        num_pergroup = sw_state['running_cov'].shape[-1]
        if sw_layers is None:
            sw_layers = [slot_path(s) for s, k in src_kinds.items() if k == 'SW']
    tie_weight = 'SW' in kinds and 'sw_var_weight' not in sw_state
    if sw_layers is not None:
        if sn_kinds:
            raise ConversionError(['--sw-layers: SN layers cannot become SW layers'])
        config = dict(type='SWResNet', depth=depth, norm_cfg=dict(type='BN'),
                      sw_cfg=dict(type='SW', sw_type=sw_type, num_pergroup=num_pergroup,
                                  tie_weight=tie_weight),
                      sw_layers=sw_layers)
        for name in SW_PLACEMENTS:  # name the placement when it is a known one
            if not isinstance(sw_layers, str) and list(sw_layers) == resolve_placement(name,
                                                                                      depth):
                config['sw_layers'] = name
        return config
    norm_cfg = dict(type='SSN' if 'SSN' in kinds and not ssn_as_sn else 'SN')
    logits = [p['mean_weight'] for p in group_modules(state).values() if 'mean_weight' in p]
    if logits and logits[0].numel() == 2:  # the (8,1) model: using_bn=False
        norm_cfg['using_bn'] = False
    return dict(type='ResNet', depth=depth, norm_cfg=norm_cfg)


def build_destination(config: dict):
    """Builds the destination backbone with mmdet's (or else mmseg's) ResNet."""
    # (importing mmsn, which imports this module, registered SN/SW; SWResNet is registered
    # when a config of its type is built: mmsn/mm/compat.py)
    for package in ('mmdet', 'mmseg'):
        try:
            registry = __import__(f'{package}.registry', fromlist=['MODELS']).MODELS
        except ImportError:
            continue
        return registry.build(dict(config, frozen_stages=-1, init_cfg=None))
    raise ImportError('converting needs mmdet or mmseg installed (their ResNet is the target)')


def convert_resnet(state: Dict[str, Tensor], sw_layers: Optional[Union[str, Sequence[str]]]
                   = None, sw_type: int = 2, num_pergroup: int = 16, ssn_as_sn: bool = False):
    """Converts a ResNet v1 state dict (prefixes already stripped).

    Args:
        state: the source tensors.
        sw_layers: SW placement of the destination ('imagenet', 'segmentation' or paths).
            Default: the source's own SW layers (SW sources), none otherwise (SN).
        sw_type, num_pergroup: SW layers made from BN layers of a BN source.
        ssn_as_sn: SSN sources become SN layers whose softmax gives the SSN ratios (instead
            of SSN layers, the default).

    Returns:
        (state dict in the destination's order, backbone config, report lines of
        ``(source key, shape, destination key or None, note)``).

    Raises:
        ConversionError: listing every tensor without a destination, every destination
        left unfilled, and every shape mismatch.
    """
    depth, src_kinds = infer_architecture(state)
    config = _destination_config(depth, src_kinds, sw_layers, sw_type, num_pergroup, state,
                                 ssn_as_sn)
    template = build_destination(config).state_dict()
    dst_modules = group_modules(template)
    dst_kinds = OrderedDict()
    for module, params in dst_modules.items():
        slot = norm_slot(module)
        if slot is not None:
            dst_kinds[slot] = (module, layer_kind(params))
    converted, report, problems = OrderedDict(), [], []
    for module, params in group_modules(state).items():
        slot = norm_slot(module)
        if module == 'fc' or module.startswith('head.'):
            report += [(f'{module}.{n}', tuple(v.shape), None, 'classifier head, dropped')
                       for n, v in params.items()]
            continue
        if slot is None:  # convolutions: same names
            for name, value in params.items():
                key = f'{module}.{name}'
                if key in template and template[key].shape == value.shape:
                    converted[key] = value.clone()
                    report.append((key, tuple(value.shape), key, ''))
                else:
                    problems.append(f'{key} {tuple(value.shape)}: no destination of that name '
                                    f'and shape')
            continue
        if slot not in dst_kinds:
            problems.append(f'{module}: norm at {slot} has no destination')
            continue
        dst_module, dst_kind = dst_kinds[slot]
        try:
            out, used = convert_layer(src_kinds[slot], params, dst_kind, dst_modules[dst_module])
        except (ValueError, KeyError) as error:
            problems.append(f'{module} ({src_kinds[slot]}) -> {dst_module} ({dst_kind}): {error}')
            continue
        for name, value in out.items():
            converted[f'{dst_module}.{name}'] = value
        for name, value in params.items():
            if name in used:
                target, note = used[name]
                report.append((f'{module}.{name}', tuple(value.shape), f'{dst_module}.{target}',
                               note))
            else:
                problems.append(f'{module}.{name} {tuple(value.shape)}: no destination')
    unfilled = [k for k in template if k not in converted]
    problems += [f'{k}: destination left unfilled' for k in unfilled]
    if problems:
        raise ConversionError(problems)
    ordered = OrderedDict((k, converted[k]) for k in template)
    return ordered, config, report


def convert_checkpoint(src: str, dst: str, sw_layers=None, sw_type: int = 2,
                       num_pergroup: int = 16, ssn_as_sn: bool = False, log=print,
                       trusted: bool = False) -> dict:
    """Converts the file ``src`` and writes an mmengine checkpoint to ``dst`` (only when the
    conversion is complete). Prints one line per source tensor through ``log``. ``src`` is
    read without running code from it unless ``trusted`` (see :func:`load_source`).

    Returns:
        dict: the ``meta`` written with the state dict.
    """
    state = load_source(src, trusted)
    converted, config, report = convert_resnet(state, sw_layers, sw_type, num_pergroup,
                                               ssn_as_sn)
    src_kinds = infer_architecture(state)[1]
    dropped = {key: note for key, _, target, note in report if target is None}
    width = max(len(key) for key, *_ in report)
    for key, shape, target, note in report:
        where = f'-> {target}' + (f' ({note})' if note else '') if target else f'dropped: {note}'
        log(f'{key:<{width}} {str(list(shape)):<16} {where}')
    meta = dict(converted_by=f'mmsn {__version__} sn2mm', source=osp.basename(src),
                source_layers=sorted(set(src_kinds.values())), depth=config['depth'],
                backbone=config, dropped=dropped)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    partial = dst + '.partial'
    torch.save(dict(state_dict=converted, meta=meta), partial)
    os.replace(partial, dst)
    log(f'wrote {dst}: {len(converted)} tensors for {config}; dropped {len(dropped)} '
        f'({", ".join(sorted(dropped)) or "none"})')
    return meta


__all__ = ['ConversionError', 'convert_checkpoint', 'convert_resnet', 'load_source',
           'extract_state_dict']
