"""What the norm layers are called with: records of SN/SW calls, the hook that takes them
from a running model, and the layers and inputs that replay them.

A record is one JSON object that says everything a call hands the op besides tensor values:

* ``layer``: the class (``SwitchNorm2d``, ``SyncSwitchWhiten2d``, ...), ``options``: the
  constructor arguments that change the call (``num_features``, ``momentum``, ``affine``,
  ``using_bn``; SW also ``num_pergroup``, ``sw_type``, ``T``, ``tie_weight``, ``method``).
  Not ``eps`` nor ``last_gamma``: a float argument and an initial value, the same launches.
* ``shape``, ``stride``: the input as the layer got it (channels_last shows in the strides).
* ``dtypes``: the input dtypes the call is replayed with. A model recorded in float32 lists
  float16 and bfloat16 too: under ``--amp`` autocast hands a norm layer the dtype of the
  convolution before it, and the layers keep it (their AMP policy: docs/kernels.md); parameters stay
  float32 either way, float64 layers are ``.double()``.
* ``train`` (the layer's mode: batch statistics and running update), ``input_grad`` and
  ``param_grad`` (what the backward computes; no backward when both are False).
* ``world``: processes the layer synchronizes over (1 unless a SyncSN/SyncSW layer ran in a
  process group); with ``world > 1``, ``peers`` holds the other ranks' ``[shape, stride]``.
* ``sources``: what made the call (``CONFIG:inference``, ``CONFIG:train``, ``sweep:...``).

``tests/data/norm_calls.json`` holds those of the shipped configs, of upstream configs under
``--norm``, of a layer sweep over the edge values and of the largest maps users feed; it is
written by ``tools/analysis_tools/record_norm_calls.py``.
``python -m mmsn.tools.compile_check --calls`` replays them plan-only and compiles every launch; ``benchmarks/replay_norm_calls.py``
replays them on a GPU against the reference. Needs torch alone.
"""
import contextlib
import json
import math
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import layers
from .layers import SwitchableLayer

#: the constructor options each layer family records (see the module docstring)
SN_OPTIONS = ('num_features', 'momentum', 'affine', 'using_bn')
SSN_OPTIONS = ('num_features', 'momentum', 'affine')
SW_OPTIONS = ('num_features', 'num_pergroup', 'sw_type', 'T', 'tie_weight', 'momentum',
              'affine', 'method')
LAYER_OPTIONS = {
    'SwitchNorm1d': SN_OPTIONS, 'SwitchNorm2d': SN_OPTIONS, 'SwitchNorm3d': SN_OPTIONS,
    'SyncSwitchNorm': SN_OPTIONS, 'SparseSwitchNorm2d': SSN_OPTIONS,
    'SyncSparseSwitchNorm2d': SSN_OPTIONS, 'SwitchWhiten2d': SW_OPTIONS,
    'SyncSwitchWhiten2d': SW_OPTIONS,
}
#: the dtypes a float32 model call is replayed with (float32, and what ``--amp`` gives)
AMP_DTYPES = ('float32', 'float16', 'bfloat16')

def describe(layer: SwitchableLayer, x: Tensor) -> dict:
    """The record of ``layer(x)`` called now (grad mode and the layer's mode as they are),
    without ``dtypes`` and ``sources``."""
    name = type(layer).__name__
    if name not in LAYER_OPTIONS:
        raise ValueError(f'layer: no record format for {name}')
    grad = torch.is_grad_enabled()
    record = dict(layer=name, options={k: getattr(layer, k) for k in LAYER_OPTIONS[name]},
                  shape=list(x.shape), stride=list(x.stride()), dtype=str(x.dtype)[6:],
                  train=layer.training, input_grad=grad and x.requires_grad,
                  param_grad=grad and any(p.requires_grad
                                          for p in layer.parameters(recurse=False)),
                  world=_world(layer))
    if x.storage_offset():
        record['offset'] = x.storage_offset()
    return record


def _world(layer: SwitchableLayer) -> int:
    group = layer.sync_group()
    if group is None:
        return 1
    from .ops.distributed import sync_world_size
    return sync_world_size(group)


def record_key(record: dict) -> str:
    """What makes two records the same call (everything but ``dtypes`` and ``sources``)."""
    return json.dumps({k: v for k, v in record.items() if k not in ('dtypes', 'sources')},
                      sort_keys=True)


class CallRecorder:
    """Records every SN/SW layer call made inside ``with recorder.source(name):``.

    A global forward pre-hook sees each call of a :class:`SwitchableLayer` (in any model);
    calls that differ only in dtype or source merge into one record.

    Args:
        dtypes (sequence of str, optional): the dtypes a recorded call is replayed with;
            default: the call's own dtype, and for float32 the ones of ``AMP_DTYPES``.
    """

    def __init__(self, dtypes: Optional[Sequence[str]] = None):
        self.dtypes = dtypes
        self.records: Dict[str, dict] = {}
        self._source: Optional[str] = None

    def add(self, record: dict, source: str, dtypes: Optional[Sequence[str]] = None) -> None:
        """Adds one record (``describe``'s, with ``dtype``) made by ``source``."""
        record = dict(record)
        dtype = record.pop('dtype')
        if dtypes is None:
            dtypes = self.dtypes or (AMP_DTYPES if dtype == 'float32' else (dtype,))
        kept = self.records.setdefault(record_key(record), dict(record, dtypes=[], sources=[]))
        kept['dtypes'] += [d for d in dtypes if d not in kept['dtypes']]
        if source not in kept['sources']:
            kept['sources'].append(source)

    def _hook(self, module, args):
        if self._source is not None and isinstance(module, SwitchableLayer) and args:
            self.add(describe(module, args[0]), self._source)

    @contextlib.contextmanager
    def source(self, name: str) -> Iterator['CallRecorder']:
        """Records the calls made inside as made by ``name``."""
        saved, self._source = self._source, name
        handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self._source = saved

    def calls(self) -> List[dict]:
        return sorted_calls(self.records.values())


def sorted_calls(records: Iterable[dict]) -> List[dict]:
    """Records in a stable order (by layer, options, shape, mode), dtypes in AMP order."""
    order = {d: i for i, d in enumerate(AMP_DTYPES + ('float64',))}
    out = []
    for record in records:
        record = dict(record, dtypes=sorted(record['dtypes'], key=order.get),
                      sources=sorted(record['sources']))
        out.append(record)
    return sorted(out, key=record_key)


def load_calls(path: str) -> List[dict]:
    """The records of a calls file (see the module docstring)."""
    with open(path) as f:
        return json.load(f)['calls']


# ------------------------------------------------------------------------------- replaying

def uses_kernels(record: dict, dtype: str) -> bool:
    """Whether the call, in ``dtype``, runs on the Triton kernels on a GPU (SW where
    :func:`~mmsn.ops.triton_switch_whiten.sw_kernels_refuse` does not refuse it)."""
    from .ops.triton_switch_whiten import sw_kernels_refuse
    options = record['options']
    if 'num_pergroup' in options:
        return sw_kernels_refuse(options['num_pergroup'], options['method'],
                                 getattr(torch, dtype)) is None
    return True


def needs_backward(record: dict) -> bool:
    return record['input_grad'] or record['param_grad']


def build_layer(record: dict, dtype: str, device='cpu') -> SwitchableLayer:
    """The recorded layer (default parameters and buffers), in its mode, with gradients
    where the call had them; float64 calls get a float64 layer, all others float32 (AMP
    keeps parameters in float32)."""
    cls = getattr(layers, record['layer'])
    layer = cls(**record['options'])
    if dtype == 'float64':
        layer = layer.double()
    layer = layer.to(device).train(record['train'])
    for param in layer.parameters():
        param.requires_grad_(record['param_grad'])
    return layer


def input_layout(record: dict, rank: int = 0) -> Tuple[List[int], List[int]]:
    """``(shape, stride)`` of the input of ``rank``."""
    if rank == 0:
        return record['shape'], record['stride']
    return tuple(record['peers'][rank - 1])


def make_input(record: dict, dtype: str, device='cpu', rank: int = 0,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """The input of ``rank`` with the recorded shape, strides and storage offset: left
    uninitialised (plan-only replays allocate without touching memory) or, with
    ``generator``, filled with ``2 * randn + 0.5``."""
    shape, stride = input_layout(record, rank)
    offset = record.get('offset', 0) if rank == 0 else 0
    span = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) \
        if all(shape) else 0
    storage = torch.empty(offset + span, dtype=getattr(torch, dtype), device=device)
    x = storage.as_strided(shape, stride, offset)
    if generator is not None and x.numel():
        values = torch.randn(x.shape, generator=generator, device=generator.device)
        x.copy_((values * 2 + 0.5).to(x.dtype))
    return x.requires_grad_(record['input_grad'])


def numel(record: dict) -> int:
    return math.prod(record['shape'])


def dumps_calls(calls: List[dict], meta: dict) -> str:
    """The calls file's text: ``meta`` first, then one record per line (diffs stay
    readable)."""
    head = json.dumps(meta, indent=1, sort_keys=True)[:-2]
    lines = ',\n'.join('  ' + json.dumps(record, sort_keys=True) for record in calls)
    return f'{head},\n "calls": [\n{lines}\n ]\n}}\n'
