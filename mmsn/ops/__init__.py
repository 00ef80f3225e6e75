"""Functional ops: backend dispatch for the layers.

``switch_norm`` runs on the Triton kernels for CUDA tensors (when triton is installed) and on
the pure-PyTorch reference otherwise. ``MMSN_BACKEND=torch`` forces the reference,
``MMSN_BACKEND=triton`` the kernels (with ``TRITON_INTERPRET=1`` they then run on CPU
tensors, which is how the tests check them without a GPU). ``switch_whiten`` dispatches
the same way for groups of 16, 32 or 64 channels.

Under ``torch.compile`` the default is the reference, which inductor turns into its own fused
kernels and can fuse with the neighbouring ReLU or residual add (a custom op is opaque to
it); ``MMSN_BACKEND=triton`` keeps mmsn's kernels there, as ``torch.ops.mmsn`` custom ops
(``sn_forward``/``sn_backward``, ``sw_forward``/``sw_backward``: the same code as eager).

A forced backend that cannot be honoured raises; a GPU older than
``MIN_COMPUTE_CAPABILITY`` uses the reference, with one warning.
"""
import functools
import importlib.util
import os
import warnings

import torch

from .distributed import all_gather_parts, sync_world_size
from .moments import merge_covariance_moments, merge_moments
from .reference import (SW_STATISTICS, inverse_sqrt_eigh, inverse_sqrt_newton, ratios_of,
                        switch_norm_reference, switch_whiten_reference)

BACKENDS = ('torch', 'triton')

if hasattr(torch.library, 'custom_op'):  # the kernels' ops need torch >= 2.4
    from .library import KERNEL_GROUP_SIZES  # (importing it registers torch.ops.mmsn.*)
    from .triton_switch_norm import switch_norm_triton
    from .triton_switch_whiten import switch_whiten_triton


# Looked up once, at import: backend_for runs in every SN/SW forward (and under dynamo).
KERNELS_AVAILABLE = (importlib.util.find_spec('triton') is not None
                     and hasattr(torch.library, 'custom_op'))
#: the oldest GPU the kernels are compiled and checked for (tests/test_kernel_resources.py)
MIN_COMPUTE_CAPABILITY = (8, 0)


def _compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    return bool(getattr(compiler, 'is_compiling', lambda: False)())


def _forced_backend() -> str:
    forced = os.environ.get('MMSN_BACKEND', '').strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f'MMSN_BACKEND: expected one of {BACKENDS}, got {forced!r}')
    if forced == 'triton' and not KERNELS_AVAILABLE:
        raise ValueError('MMSN_BACKEND: triton was asked for, but the kernels need triton '
                         f'and torch >= 2.4 (torch {torch.__version__})')
    return forced


@functools.lru_cache(maxsize=None)
def gpu_supported(device: torch.device) -> bool:
    """Whether the kernels run on this CUDA device; warns once per device when not."""
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        warnings.warn(f'mmsn: {torch.cuda.get_device_name(device)} has compute capability '
                      f'{capability[0]}.{capability[1]}; the Triton kernels are built and '
                      f'checked for {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} '
                      'and newer, so SN/SW use the PyTorch reference on it')
        return False
    return True


def backend_for(x) -> str:
    """The backend that ``switch_norm`` uses for ``x`` (see the module docstring)."""
    forced = _forced_backend()
    if forced:
        return forced
    if _compiling():  # inductor fuses the reference with its neighbours
        return 'torch'
    if x.is_cuda and KERNELS_AVAILABLE and gpu_supported(x.device):
        return 'triton'
    return 'torch'


def switch_norm(x, mean_weight, var_weight, *args, logits: bool = True, **kwargs):
    """Switchable Normalization on the backend :func:`backend_for` picks. ``mean_weight``
    and ``var_weight`` are the ratio logits (``logits``; softmax in at least float32) or
    the ratios themselves; the other arguments as for
    :func:`~mmsn.ops.reference.switch_norm_reference`."""
    if backend_for(x) == 'triton':
        return switch_norm_triton(x, mean_weight, var_weight, *args, logits=logits,
                                  compiling=_compiling(), **kwargs)
    return switch_norm_reference(x, ratios_of(mean_weight, logits),
                                 ratios_of(var_weight, logits), *args, **kwargs)


def switch_whiten(x, mean_ratio, var_ratio, *args, num_pergroup: int, logits: bool = False,
                  method: str = 'newton', **kwargs):
    """Switchable Whitening on the backend :func:`backend_for` picks. ``mean_ratio`` and
    ``var_ratio`` are the ratios, or their logits with ``logits`` (softmax in at least
    float32); the other arguments as for
    :func:`~mmsn.ops.reference.switch_whiten_reference`. The kernels take groups of 16, 32
    or 64 channels and Newton's iteration: other group sizes and ``method='eigh'`` use the
    reference, and raise when ``MMSN_BACKEND=triton`` forces the kernels."""
    backend = backend_for(x)
    if backend == 'triton' and (num_pergroup not in KERNEL_GROUP_SIZES or method != 'newton'):
        if _forced_backend():
            if method != 'newton':
                raise ValueError(f"method: MMSN_BACKEND=triton forces the kernels, which "
                                 f"implement 'newton', got {method!r}")
            raise ValueError(f'num_pergroup: MMSN_BACKEND=triton forces the kernels, which take '
                             f'{KERNEL_GROUP_SIZES} channels per group, got {num_pergroup}')
        backend = 'torch'
    if backend == 'triton':
        return switch_whiten_triton(x, mean_ratio, var_ratio, *args, num_pergroup=num_pergroup,
                                    method=method, logits=logits, compiling=_compiling(),
                                    **kwargs)
    return switch_whiten_reference(x, ratios_of(mean_ratio, logits),
                                   ratios_of(var_ratio, logits), *args,
                                   num_pergroup=num_pergroup, method=method, **kwargs)


__all__ = [
    'switch_norm', 'switch_whiten', 'switch_norm_reference', 'switch_whiten_reference',
    'inverse_sqrt_newton', 'inverse_sqrt_eigh', 'SW_STATISTICS', 'merge_moments',
    'merge_covariance_moments', 'all_gather_parts', 'sync_world_size', 'backend_for', 'BACKENDS'
]
