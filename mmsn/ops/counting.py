"""Counting what a piece of code asks the device to do (the launch budget): mmsn's
Triton launches, seen at their one launch site, plus the aten ops that do device work outside
them. Views, metadata reads and allocations are not device work (allocations are counted
apart); ops that make the host wait for the device are counted apart too. Launches can be
planned without running (``run_launches=False``): what is dispatched never depends on device
data, so the counts stay right. Used by ``tests/test_launch_budget.py`` and
``benchmarks/bench_host_overhead.py``.
"""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

#: ops that allocate without writing (an allocation is not a launch)
ALLOCATIONS = frozenset({'empty', 'empty_like', 'empty_strided', 'new_empty',
                         'new_empty_strided'})
#: ops that read metadata or alias without a launch
NO_WORK = frozenset({'detach', 'alias', 'lift_fresh', 'is_same_size', 'sym_size', 'sym_stride',
                     'sym_numel', 'sym_storage_offset', 'is_contiguous', 'size', 'stride',
                     'dim', '_unsafe_view', 'promote_types'})
#: ops that make the host wait for the device
HOST_SYNCS = frozenset({'_local_scalar_dense', 'item', 'nonzero', 'is_nonzero', 'equal'})


class _Dispatched(TorchDispatchMode):

    def __init__(self, counts: 'DeviceWork'):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNCS:
            self.counts.host_syncs[name] += 1
        if name in ALLOCATIONS:
            self.counts.allocations[name] += 1
        elif not (func.is_view or name in NO_WORK or name in HOST_SYNCS):
            self.counts.aten[name] += 1
        return func(*args, **(kwargs or {}))


class DeviceWork:
    """Context manager counting launches (``launches``), device-work aten ops (``aten``),
    allocations and host syncs of the code inside.

    Args:
        run_launches (bool): run mmsn's Triton launches (True) or only count them.
    """

    def __init__(self, run_launches: bool = False):
        self.run_launches = run_launches
        self.launches, self.aten = Counter(), Counter()
        self.allocations, self.host_syncs = Counter(), Counter()

    def _observe(self, kernel, grid, arguments) -> bool:
        self.launches[getattr(kernel, 'fn', kernel).__name__] += 1
        return self.run_launches

    def __enter__(self) -> 'DeviceWork':
        from .launching import observe_launches
        self._observing = observe_launches(self._observe)
        self._observing.__enter__()
        self._dispatched = _Dispatched(self)
        self._dispatched.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._dispatched.__exit__(*exc)
        self._observing.__exit__(*exc)

    @property
    def total(self) -> int:
        """Launches plus device-work aten ops."""
        return sum(self.launches.values()) + sum(self.aten.values())

    def __repr__(self) -> str:
        return (f'{self.total} (launches {dict(self.launches)}, aten {dict(self.aten)}, '
                f'allocations {dict(self.allocations)}, host syncs {dict(self.host_syncs)})')
