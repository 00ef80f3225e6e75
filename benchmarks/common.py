"""Timing, environment facts and table/CSV output shared by the benchmarks."""
import argparse
import contextlib
import csv
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def environment() -> Dict[str, str]:
    """What a figure was measured on."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, ' \
                 f'{torch.get_num_threads()} threads)'
    facts = dict(device=device, torch=torch.__version__, python=platform.python_version())
    try:
        import triton
        facts['triton'] = triton.__version__
    except ImportError:
        pass
    return facts


@contextlib.contextmanager
def environment_variable(name: str, value):
    """``name=value`` in the environment inside (unset for None or ''), restored after."""
    saved = os.environ.pop(name, None)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def mmsn_backend(backend: str):
    """mmsn's backend forced to ``backend`` inside (``''``: chosen per call), restored
    after (``mmsn.ops.use_backend``)."""
    from mmsn.ops import use_backend
    return use_backend(backend or None)


def measure(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Median time of ``fn`` in milliseconds: on a GPU device time from CUDA events
    (``triton.testing.do_bench``, ``repeats`` of them at least), on the CPU wall time."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        single = do_bench(fn, warmup=1, rep=1, return_mode='median')
        return do_bench(fn, warmup=max(25, warmup * single),
                        rep=max(100, repeats * single), return_mode='median')
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def positive_int(text: str) -> int:
    """argparse ``type`` for counts and sizes: a clear error for 0 or less (rather than a
    ZeroDivisionError or an empty table later)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def add_smoke_option(parser) -> None:
    """``--smoke``: tiny shapes, one repeat, and mmsn's kernels included even on the CPU
    (run with ``TRITON_INTERPRET=1`` there): every pass and option of a GPU run, in
    seconds, so that a GPU run can only fail for GPU reasons (tests/test_benchmarks.py)."""
    parser.add_argument('--smoke', action='store_true',
                        help='tiny shapes, one repeat, kernels included on the CPU too '
                             '(with TRITON_INTERPRET=1): a check that the script runs')


def report(rows: List[Dict[str, object]], csv_path: str, title: str) -> None:
    """Prints rows as a table (with the environment) and writes them to ``csv_path``."""
    facts = environment()
    print(f'# {title}')
    print('# ' + ', '.join(f'{k}: {v}' for k, v in facts.items()))
    columns = list(rows[0])
    widths = [max(len(str(c)), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print('  '.join(str(c).ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print('  '.join(_fmt(row[c]).ljust(w) for c, w in zip(columns, widths)))
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns + list(facts))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **facts})
    print(f'# wrote {csv_path}')


def _fmt(value) -> str:
    return f'{value:.3f}' if isinstance(value, float) else str(value)
