"""Functional ops: backend dispatch for the layers.

``switch_norm`` runs on the Triton kernels for CUDA tensors (when triton is installed) and on
the pure-PyTorch reference otherwise; ``switch_whiten`` the same way for groups of 16, 32 or
64 channels. ``MMSN_BACKEND=torch`` (read once, at import) or ``set_backend('torch')`` /
``use_backend('torch')`` forces the reference, ``'triton'`` the kernels (with
``TRITON_INTERPRET=1`` they then run on CPU tensors, which is how the tests check them
without a GPU); otherwise each call chooses from its tensor's device.

Each op's fast path lives in one module named after it, ``triton_switch_norm.py`` and
``triton_switch_whiten.py`` (the launches, the autograd Function, the custom ops), beside
``launching.py`` (what every launch shares) and ``reference.py`` (the oracle).

Under ``torch.compile`` the default is the reference, which inductor turns into its own fused
kernels and can fuse with the neighbouring ReLU or residual add (a custom op is opaque to
it); ``MMSN_BACKEND=triton`` keeps mmsn's kernels there, as ``torch.ops.mmsn`` custom ops
(``sn_forward``/``sn_backward``, ``sw_forward``/``sw_backward``: the same code as eager).

A forced backend that cannot be honoured raises; a CUDA tensor that the kernels cannot serve
(no Triton, a torch without ``torch.library.custom_op``, a GPU older than
``MIN_COMPUTE_CAPABILITY``) takes the reference, with one warning per device naming what is
missing.
"""
import contextlib
import functools
import importlib.util
import os
import warnings
from typing import List, Optional

import torch
from torch import Tensor

from .configs import SW_STATISTICS, SNConfig, SWConfig
from .distributed import all_gather_parts, sync_world_size
from .moments import merge_covariance_moments, merge_moments
from .reference import (inverse_sqrt_eigh, inverse_sqrt_newton, ratios_of,
                        switch_norm_reference, switch_whiten_reference)

BACKENDS = ('torch', 'triton')
# Looked up once, at import: backend_for runs in every SN/SW forward (and under dynamo).
TRITON_AVAILABLE = importlib.util.find_spec('triton') is not None
#: the kernels' ops are ``torch.library.custom_op``s (torch >= 2.4)
CUSTOM_OPS_AVAILABLE = hasattr(torch.library, 'custom_op')

if CUSTOM_OPS_AVAILABLE:
    from .triton_switch_norm import switch_norm_triton
    from .triton_switch_whiten import sw_kernels_refuse, switch_whiten_triton

KERNELS_AVAILABLE = TRITON_AVAILABLE and CUSTOM_OPS_AVAILABLE
#: the oldest GPU the kernels are compiled and checked for (tests/test_kernel_resources.py)
MIN_COMPUTE_CAPABILITY = (8, 0)


def _compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    return bool(getattr(compiler, 'is_compiling', lambda: False)())


def _backend_name(name: Optional[str], argument: str) -> str:
    """``name`` checked: 'torch', 'triton' or '' (None: '') for the per-call choice."""
    value = (name or '').strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f'{argument}: expected one of {BACKENDS} or unset, got {name!r}')
    return value


#: the forced backend ('' = chosen per call from the tensor): ``MMSN_BACKEND``, read once at
#: import, then :func:`set_backend` / :func:`use_backend`
_forced = _backend_name(os.environ.get('MMSN_BACKEND'), 'MMSN_BACKEND')


def set_backend(name: Optional[str]) -> str:
    """Forces every SN/SW call onto one backend ('torch': the reference, 'triton': the
    kernels), or with None lets each call choose from its tensor's device (CUDA: the kernels
    where they can serve it). Starts as ``MMSN_BACKEND``. Returns the previous setting."""
    global _forced
    previous, _forced = _forced, _backend_name(name, 'backend')
    return previous


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """:func:`set_backend` inside the block, the previous setting restored after."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _forced_backend() -> str:
    if _forced == 'triton' and not KERNELS_AVAILABLE:
        raise ValueError('backend: triton was asked for (MMSN_BACKEND or set_backend), but the '
                         f'kernels need triton and torch >= 2.4 (torch {torch.__version__})')
    return _forced


def _missing_for_kernels(device: torch.device) -> List[str]:
    """What keeps the kernels from running on a CUDA device (nothing: an empty list)."""
    name = torch.cuda.get_device_name(device)
    missing = []
    if not TRITON_AVAILABLE:
        missing.append('Triton is not installed (pip install triton)')
    if not CUSTOM_OPS_AVAILABLE:
        missing.append(f'torch {torch.__version__} has no torch.library.custom_op, which the '
                       'kernels are registered with (torch >= 2.4)')
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        missing.append(f'{name} has compute capability {capability[0]}.{capability[1]}; the '
                       'kernels are built and checked for '
                       f'{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} and newer')
    return missing


@functools.lru_cache(maxsize=None)
def gpu_supported(device: torch.device) -> bool:
    """Whether the kernels run on this CUDA device; when not, warns (once per device,
    naming what is missing) that SN/SW take the PyTorch reference there."""
    missing = _missing_for_kernels(device)
    if missing:
        warnings.warn(f'mmsn: SN/SW use the PyTorch reference on {device} '
                      f'({torch.cuda.get_device_name(device)}), not the Triton kernels: '
                      + '; '.join(missing))
        return False
    return True


def backend_for(x) -> str:
    """The backend that ``switch_norm`` uses for ``x`` (see the module docstring)."""
    forced = _forced_backend()
    if forced:
        return forced
    if _compiling():  # inductor fuses the reference with its neighbours
        return 'torch'
    if x.is_cuda and gpu_supported(x.device):
        return 'triton'
    return 'torch'


def switch_norm(x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                config: SNConfig, *, use_batch_stats: bool,
                sync: Optional[object] = None) -> Tensor:
    """Switchable Normalization on the backend :func:`backend_for` picks; the arguments as
    for :func:`~mmsn.ops.reference.switch_norm_reference`.

    ``config`` holds the layer's options (built once, with the layer); ``use_batch_stats``
    (training) and ``sync`` (the process group whose whole batch the BN branch pools, None
    for this process's) come with each call, since ``train()``/``eval()`` and the process
    group change after a layer is built.
    """
    tensors = (x, mean_weight, var_weight, weight, bias, running_mean, running_var,
               num_batches_tracked)
    if backend_for(x) == 'triton':
        return switch_norm_triton(*tensors, config, use_batch_stats=use_batch_stats, sync=sync,
                                  compiling=_compiling())
    return switch_norm_reference(*tensors, config, use_batch_stats=use_batch_stats, sync=sync)


def switch_whiten(x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], running_mean: Optional[Tensor],
                  running_cov: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                  config: SWConfig, *, use_batch_stats: bool,
                  sync: Optional[object] = None) -> Tensor:
    """Switchable Whitening on the backend :func:`backend_for` picks; the arguments as for
    :func:`~mmsn.ops.reference.switch_whiten_reference`, and as for :func:`switch_norm`.

    The kernels take groups of 16, 32 or 64 channels (float64 at 16 or 32) and Newton's
    iteration: other calls use the reference, and raise when ``MMSN_BACKEND=triton`` forces
    the kernels (:func:`~mmsn.ops.triton_switch_whiten.sw_kernels_refuse`).
    """
    backend = backend_for(x)
    if backend == 'triton':
        refusal = sw_kernels_refuse(config.num_pergroup, config.method, x.dtype)
        if refusal and _forced_backend():
            raise ValueError(f"backend 'triton' (MMSN_BACKEND or set_backend) forces the kernels: "
                             f'{refusal}')
        if refusal:
            backend = 'torch'
    tensors = (x, mean_weight, var_weight, weight, bias, running_mean, running_cov,
               num_batches_tracked)
    if backend == 'triton':
        return switch_whiten_triton(*tensors, config, use_batch_stats=use_batch_stats,
                                    sync=sync, compiling=_compiling())
    return switch_whiten_reference(*tensors, config, use_batch_stats=use_batch_stats, sync=sync)


__all__ = [
    'switch_norm', 'switch_whiten', 'SNConfig', 'SWConfig', 'ratios_of',
    'switch_norm_reference', 'switch_whiten_reference',
    'inverse_sqrt_newton', 'inverse_sqrt_eigh', 'SW_STATISTICS', 'merge_moments',
    'merge_covariance_moments', 'all_gather_parts', 'sync_world_size', 'backend_for', 'BACKENDS',
    'set_backend', 'use_backend'
]
