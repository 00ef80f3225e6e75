"""Forward, backward and both for SN: mmsn's Triton kernels, mmsn's PyTorch reference,
cuDNN BatchNorm2d and GroupNorm(32), over the ResNet-50 norm shapes, measured in one run.

    python benchmarks/bench_switch_norm.py [--batches 2 8 32] [--dtypes float32 bfloat16]
        [--layouts nchw channels_last] [--csv PATH] [--smoke]

Reports ms, effective bandwidth (the minimal bytes: forward reads x and writes y, backward
reads x and dy and writes dx) and its fraction of the measured copy bandwidth, peak memory,
each time as a ratio to BatchNorm2d in the same run, and the kernels' speed-up over the
reference. Needs only torch (+ triton).
"""
import argparse
import os.path as osp
import sys

import torch
from torch import nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import add_smoke_option, measure, mmsn_backend, positive_int, report  # noqa: E402

# (channels, height, width) of the norm layers of ResNet-50 at 224x224, one per distinct shape
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
                   (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
                   (512, 7, 7), (2048, 7, 7)]


#: the tiny shape of the smoke run (channels a multiple of SW's 16 per group)
SMOKE_SHAPES = [(32, 5, 7)]


def copy_bandwidth(device, mebibytes: int = 256) -> float:
    """GB/s of a large device copy (read + write)."""
    x = torch.empty(mebibytes * 2 ** 20 // 4, device=device)
    y = torch.empty_like(x)
    ms = measure(lambda: y.copy_(x), repeats=10)
    return 2 * x.numel() * 4 / ms / 1e6


def layers(channels, device, dtype, backends):
    import mmsn
    made = {}
    for name in backends:
        if name in ('mmsn-triton', 'mmsn-torch'):
            made[name] = (mmsn.SwitchNorm2d(channels), name.split('-')[1])
        elif name == 'BatchNorm2d':
            made[name] = (nn.BatchNorm2d(channels), None)
        elif name == 'GroupNorm32':
            made[name] = (nn.GroupNorm(32, channels), None)
    for layer, _ in made.values():
        layer.to(device)
    return made


def time_layer(layer, backend, x, what, repeats=5):
    """Median ms and peak MiB of ``what`` ('forward', 'backward', 'both') of ``layer`` on
    ``x``, with ``MMSN_BACKEND=backend`` (None: the layer is not mmsn's)."""
    with mmsn_backend(backend):
        grad = torch.randn_like(x)
        xg = x.detach().requires_grad_()

        def forward():
            with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
                return layer(xg)

        if what == 'forward':
            fn = forward
        elif what == 'backward':
            y = forward()
            fn = lambda: torch.autograd.grad(y, xg, grad, retain_graph=True)  # noqa: E731
        else:
            fn = lambda: torch.autograd.grad(forward(), xg, grad)  # noqa: E731
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = measure(fn, warmup=min(2, repeats), repeats=repeats)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if x.is_cuda else float('nan')
    return ms, peak


def parse_args(description, argv=None, default_csv='benchmarks/results/switch_norm.csv',
               add_arguments=None):
    """The sweep's options (``add_arguments(parser)`` adds a script's own)."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument('--batches', type=positive_int, nargs='+', default=[2, 8, 32])
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
    parser.add_argument('--layouts', nargs='+', default=['nchw', 'channels_last'])
    parser.add_argument('--csv', default=default_csv)
    add_smoke_option(parser)
    return parser.parse_args(argv)


def sweep(args, make_layers, backends, title):
    """Times every layer of ``make_layers(channels, device, dtype, backends)`` over the
    shapes, batches, dtypes and layouts of ``args``; prints and writes the table."""
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' or args.smoke:  # (interpreted Triton on a CPU is no timing)
        backends = ['mmsn-triton'] + backends
    shapes = SMOKE_SHAPES if args.smoke else RESNET50_SHAPES
    batches = [2] if args.smoke else args.batches
    repeats = 1 if args.smoke else 5
    bandwidth = copy_bandwidth(device, 4 if args.smoke else 256)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for layout in args.layouts:
            for n in batches:
                for c, h, w in shapes:
                    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
                    if layout == 'channels_last':
                        x = x.to(memory_format=torch.channels_last)
                    bn_ms = {}
                    made = make_layers(c, device, dtype, backends)
                    for name, (layer, backend) in made.items():
                        for what in ('forward', 'backward', 'forward+backward'):
                            ms, peak = time_layer(layer, backend, x, what, repeats)
                            passes = {'forward': 2, 'backward': 3, 'forward+backward': 5}[what]
                            gbps = passes * x.numel() * x.element_size() / ms / 1e6
                            if name == 'BatchNorm2d':
                                bn_ms[what] = ms
                            rows.append(dict(op=name, pass_=what, dtype=dtype_name,
                                             layout=layout, shape=f'{n}x{c}x{h}x{w}', ms=ms,
                                             GBps=gbps, copy_fraction=gbps / bandwidth,
                                             peak_MiB=peak))
                    these = rows[-len(made) * 3:]
                    ms_of = {(r['op'], r['pass_']): r['ms'] for r in these}
                    for row in these:
                        row['vs_BN'] = row['ms'] / bn_ms[row['pass_']]
                        # the kernels' speed-up over mmsn's reference on the same layer
                        reference = ms_of.get((row['op'].replace('-triton', '-torch'),
                                               row['pass_']))
                        row['speedup_vs_reference'] = (
                            reference / row['ms'] if reference and '-triton' in row['op']
                            else float('nan'))
    report(rows, args.csv, f'{title} (copy bandwidth {bandwidth:.0f} GB/s)')


def main(argv=None):
    args = parse_args(__doc__.split('\n')[0], argv)
    sweep(args, layers, ['mmsn-torch', 'BatchNorm2d', 'GroupNorm32'], 'SN layer benchmark')


if __name__ == '__main__':
    main()
