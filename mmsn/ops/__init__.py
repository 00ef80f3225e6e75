"""Functional ops: backend dispatch for the layers.

``switch_norm`` runs on the Triton kernels for CUDA tensors (when triton is installed) and on
the pure-PyTorch reference otherwise. ``MMSN_BACKEND=torch`` forces the reference,
``MMSN_BACKEND=triton`` the kernels (with ``TRITON_INTERPRET=1`` they then run on CPU
tensors, which is how the tests check them without a GPU). ``switch_whiten`` dispatches
the same way for groups of 16, 32 or 64 channels.

Under ``torch.compile`` the default is the reference, which inductor turns into its own fused
kernels and can fuse with the neighbouring ReLU or residual add (a custom op is opaque to
it); ``MMSN_BACKEND=triton`` keeps mmsn's kernels there, as the ``torch.ops.mmsn`` custom
ops composed with the traced mixing step (see ``library.py``).
"""
import importlib.util
import os

import torch

from .distributed import all_gather_parts, sync_world_size
from .moments import merge_covariance_moments, merge_moments
from .reference import (SW_STATISTICS, inverse_sqrt_eigh, inverse_sqrt_newton,
                        switch_norm_reference, switch_whiten_reference)

BACKENDS = ('torch', 'triton')

if hasattr(torch.library, 'custom_op'):  # the kernels' ops need torch >= 2.4
    from .library import KERNEL_GROUP_SIZES  # (importing it registers torch.ops.mmsn.*)
    from .triton_switch_norm import switch_norm_triton
    from .triton_switch_whiten import switch_whiten_triton


# Looked up once, at import: backend_for runs in every SN/SW forward (and under dynamo).
KERNELS_AVAILABLE = (importlib.util.find_spec('triton') is not None
                     and hasattr(torch.library, 'custom_op'))


def _compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    return bool(getattr(compiler, 'is_compiling', lambda: False)())


def backend_for(x) -> str:
    """The backend that ``switch_norm`` uses for ``x`` (see the module docstring)."""
    forced = os.environ.get('MMSN_BACKEND', '').strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f'MMSN_BACKEND: expected one of {BACKENDS}, got {forced!r}')
        if forced == 'triton' and not KERNELS_AVAILABLE:
            raise ValueError('MMSN_BACKEND: triton was asked for, but the kernels need triton '
                             f'and torch >= 2.4 (torch {torch.__version__})')
        return forced
    if _compiling():  # inductor fuses the reference with its neighbours
        return 'torch'
    if x.is_cuda and KERNELS_AVAILABLE:
        return 'triton'
    return 'torch'


def switch_norm(x, *args, **kwargs):
    """Switchable Normalization on the backend :func:`backend_for` picks; arguments as for
    :func:`~mmsn.ops.reference.switch_norm_reference`."""
    if backend_for(x) == 'triton':
        return switch_norm_triton(x, *args, composed=_compiling(), **kwargs)
    return switch_norm_reference(x, *args, **kwargs)


def switch_whiten(x, *args, num_pergroup: int, **kwargs):
    """Switchable Whitening on the backend :func:`backend_for` picks (the kernels take
    groups of 16, 32 or 64 channels; other group sizes always use the reference); arguments
    as for :func:`~mmsn.ops.reference.switch_whiten_reference`."""
    if backend_for(x) == 'triton' and num_pergroup in KERNEL_GROUP_SIZES:
        return switch_whiten_triton(x, *args, num_pergroup=num_pergroup,
                                    composed=_compiling(), **kwargs)
    return switch_whiten_reference(x, *args, num_pergroup=num_pergroup, **kwargs)

__all__ = [
    'switch_norm', 'switch_whiten', 'switch_norm_reference', 'switch_whiten_reference',
    'inverse_sqrt_newton', 'inverse_sqrt_eigh', 'SW_STATISTICS', 'merge_moments',
    'merge_covariance_moments', 'all_gather_parts', 'sync_world_size', 'backend_for', 'BACKENDS'
]
