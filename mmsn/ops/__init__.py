"""Functional ops: input checks and backend dispatch for the layers.

Only the pure-PyTorch backend (``reference.py``) exists today; the layers call these entry
points, not the reference directly, so fused kernels can be dispatched here later without
touching the modules.
"""
from .distributed import all_gather_parts, sync_world_size
from .moments import merge_covariance_moments, merge_moments
from .reference import (SW_STATISTICS, inverse_sqrt_eigh, inverse_sqrt_newton,
                        switch_norm_reference, switch_whiten_reference)

switch_norm = switch_norm_reference
switch_whiten = switch_whiten_reference

__all__ = [
    'switch_norm', 'switch_whiten', 'switch_norm_reference', 'switch_whiten_reference',
    'inverse_sqrt_newton', 'inverse_sqrt_eigh', 'SW_STATISTICS', 'merge_moments',
    'merge_covariance_moments', 'all_gather_parts', 'sync_world_size'
]
