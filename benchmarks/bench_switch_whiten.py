"""Forward, backward and both for SW (sw_type 2 and 5, 16 and 64 channels per group, T = 5):
mmsn's Triton kernels and PyTorch reference, against cuDNN BatchNorm2d, measured in one run.

    python benchmarks/bench_switch_whiten.py [--batches 2 8 32] [--dtypes float32 bfloat16]
        [--layouts nchw channels_last] [--per-group 16 64] [--csv PATH] [--smoke]

Same columns as bench_switch_norm.py; a layer is named ``SW{sw_type}-{per group}``, and a
group size that does not divide a shape's channels is left out there (the smoke shape has
32 channels: 16 only; bench_host_overhead.py smokes the 64-per-group kernels). Needs only
torch (+ triton).
"""
import functools
import os.path as osp
import sys

from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from bench_switch_norm import parse_args, sweep  # noqa: E402
from common import positive_int  # noqa: E402


def layers(channels, device, dtype, backends, *, per_group):
    import mmsn
    made = {}
    for backend in (b for b in backends if b.startswith('mmsn-')):
        for group in (g for g in per_group if channels % g == 0):
            for sw_type in (2, 5):
                layer = mmsn.SwitchWhiten2d(channels, num_pergroup=group, sw_type=sw_type, T=5)
                made[f'SW{sw_type}-{group} {backend}'] = (layer.to(device),
                                                          backend.split('-')[1])
    made['BatchNorm2d'] = (nn.BatchNorm2d(channels).to(device), None)
    return made


def add_arguments(parser):
    from mmsn.ops.triton_switch_whiten import KERNEL_GROUP_SIZES
    parser.add_argument('--per-group', type=positive_int, nargs='+', default=[16, 64],
                        choices=KERNEL_GROUP_SIZES,
                        help='channels per whitening group (the sizes the kernels take)')


def main(argv=None):
    args = parse_args(__doc__.split('\n')[0], argv, 'benchmarks/results/switch_whiten.csv',
                      add_arguments)
    sweep(args, functools.partial(layers, per_group=args.per_group),
          ['mmsn-torch', 'BatchNorm2d'], 'SW layer benchmark')


if __name__ == '__main__':
    main()
