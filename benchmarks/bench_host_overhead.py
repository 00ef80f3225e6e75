"""Host time of one norm layer's forward + backward where launches dominate:
BN, GN, SN and SW at a tiny shape, as ratios to BN, with each layer's device work (Triton
launches + aten ops that launch, counted by ``mmsn.ops.counting.DeviceWork``).

On the CPU the SN/SW kernels are planned but not launched (``observe_launches`` returning
False, so Triton's interpreter does not run): what is left is the host work a GPU step would
pay. On a GPU every launch runs; host time is the wall time per step without a synchronise
(N steps, then one), device time from CUDA events.

    python benchmarks/bench_host_overhead.py [--shape 2 64 2 2] [--steps 1000] [--rounds 20]
        [--csv PATH] [--smoke]
"""
import argparse
import contextlib
import os.path as osp
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (add_smoke_option, environment_variable, mmsn_backend,  # noqa: E402
                    positive_int, report)


def layers(channels: int):
    import mmsn
    return [('BN', '', lambda: nn.BatchNorm2d(channels)),
            ('GN', '', lambda: nn.GroupNorm(min(32, channels), channels)),
            ('SN (kernels)', 'triton', lambda: mmsn.SwitchNorm2d(channels)),
            ('SN (reference)', 'torch', lambda: mmsn.SwitchNorm2d(channels)),
            ('SW-16 (kernels)', 'triton', lambda: mmsn.SwitchWhiten2d(channels,
                                                                       num_pergroup=16)),
            ('SW-64 (kernels)', 'triton', lambda: mmsn.SwitchWhiten2d(channels,
                                                                       num_pergroup=64))]


def timed_steps(layer, x, dy, steps: int, launch: bool):
    """(host ms of each of ``steps`` steps, device ms of all of them or None)."""
    from mmsn.ops.launching import observe_launches
    planning = contextlib.nullcontext() if launch else observe_launches(lambda *a: False)
    cuda = x.is_cuda
    with planning:
        layer(x).backward(dy)  # (warm: caches, allocator)
        if cuda:
            torch.cuda.synchronize()
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            layer(x).backward(dy)
            times.append((time.perf_counter() - start) * 1e3)
        if cuda:
            end_event.record()
            torch.cuda.synchronize()
            return times, start_event.elapsed_time(end_event)
    return times, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shape', type=positive_int, nargs=4, default=[2, 64, 2, 2])
    parser.add_argument('--steps', type=positive_int, default=1000)
    parser.add_argument('--rounds', type=positive_int, default=20,
                        help='the steps of every layer in this many interleaved chunks, so '
                             'that a slow spell of the machine hits every layer alike')
    parser.add_argument('--csv', default='benchmarks/results/host_overhead.csv')
    add_smoke_option(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds = 2, 2
    from mmsn.ops.counting import DeviceWork
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    x = torch.randn(args.shape, device=device, requires_grad=True)
    dy = torch.randn(args.shape, device=device)
    rows, runs = [], []
    for name, backend, build in layers(args.shape[1]):
        interpret = backend == 'triton' and device == 'cpu'
        settings = (backend, '1' if interpret else None)
        with mmsn_backend(backend), environment_variable('TRITON_INTERPRET', settings[1]):
            layer = build().to(device)
            x.grad = None  # counted as in a step whose gradients start as None
            with DeviceWork(run_launches=device == 'cuda') as forward:
                y = layer(x)
            with DeviceWork(run_launches=device == 'cuda') as backward:
                y.backward(dy)
        rows.append(dict(layer=name, forward_work=forward.total, backward_work=backward.total))
        runs.append((layer, settings, [], []))
    chunk = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for layer, (backend, interpret), times, gpu in runs:
            with mmsn_backend(backend), environment_variable('TRITON_INTERPRET', interpret):
                host, device_ms = timed_steps(layer, x, dy, chunk, launch=device == 'cuda')
            times += host
            if device_ms is not None:
                gpu.append(device_ms)
    for row, (_, _, times, gpu) in zip(rows, runs):
        row['host_ms'] = statistics.median(times)
        row['gpu_ms'] = sum(gpu) / len(times) if gpu else '-'
    base = rows[0]['host_ms']
    for row in rows:
        row['host_vs_bn'] = row['host_ms'] / base
    report(rows, args.csv, f'host time of one layer forward+backward, shape {tuple(args.shape)}'
           f', float32, median of {chunk * args.rounds} steps in {args.rounds} interleaved '
           f'rounds' + ('' if device == 'cuda' else '; CPU: Triton launches counted, not run'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
