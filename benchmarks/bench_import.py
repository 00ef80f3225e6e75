"""What ``import mmsn`` costs: wall time of fresh interpreters importing torch, torch +
mmengine's registry, that + the mmengine modules every training imports (hooks, runner,
optim), and mmsn; medians of several runs, measured in the same run, with the ratio over
torch + mmengine's registry. Also checks that mmdet and mmseg stay unimported.

    python benchmarks/bench_import.py [--repeats 5] [--csv PATH] [--smoke]
"""
import argparse
import os.path as osp
import statistics
import subprocess
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import add_smoke_option, positive_int, report  # noqa: E402

CASES = [
    ('torch', 'import torch'),
    ('torch + mmengine registry', 'import torch, mmengine.registry'),
    ('+ mmengine hooks/runner/optim', 'import torch, mmengine.registry, mmengine.hooks, '
                                      'mmengine.runner.checkpoint, mmengine.optim'),
    ('mmsn', 'import mmsn'),
    ('mmsn + mmdet.models', 'import mmsn, mmdet.models'),
]


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', code], check=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=positive_int, default=5)
    parser.add_argument('--csv', default='benchmarks/results/import.csv')
    add_smoke_option(parser)
    args = parser.parse_args(argv)
    cases = CASES
    if args.smoke:
        args.repeats = 1
        cases = [case for case in CASES if case[0] in ('torch + mmengine registry', 'mmsn')]
    leaked = subprocess.run(
        [sys.executable, '-c', 'import sys, mmsn; print([m for m in ("mmdet", "mmseg") '
                               'if m in sys.modules])'],
        check=True, capture_output=True, text=True).stdout.strip()
    medians = {}
    for name, code in cases:
        if not args.smoke:
            seconds(code)  # warm the file cache
        medians[name] = statistics.median(seconds(code) for _ in range(args.repeats))
    base = medians['torch + mmengine registry']
    rows = [dict(imports=name, seconds=value, over_registry=value - base)
            for name, value in medians.items()]
    report(rows, args.csv, f'import time, median of {args.repeats} fresh interpreters; '
                           f'mmdet/mmseg imported by mmsn: {leaked}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
