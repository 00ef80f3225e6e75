"""Forward, backward and both for SW (sw_type 2 and 5, 16 channels per group, T = 5):
mmsn's Triton kernels and PyTorch reference, against cuDNN BatchNorm2d, measured in one run.

    python benchmarks/bench_switch_whiten.py [--batches 2 8 32] [--dtypes float32 bfloat16]
        [--layouts nchw channels_last] [--csv PATH] [--smoke]

Same columns as bench_switch_norm.py. Needs only torch (+ triton).
"""
import os.path as osp
import sys

from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from bench_switch_norm import parse_args, sweep  # noqa: E402


def layers(channels, device, dtype, backends):
    import mmsn
    made = {}
    for backend in (b for b in backends if b.startswith('mmsn-')):
        for sw_type in (2, 5):
            layer = mmsn.SwitchWhiten2d(channels, num_pergroup=16, sw_type=sw_type, T=5)
            made[f'SW{sw_type} {backend}'] = (layer.to(device), backend.split('-')[1])
    made['BatchNorm2d'] = (nn.BatchNorm2d(channels).to(device), None)
    return made


def main(argv=None):
    args = parse_args(__doc__.split('\n')[0], argv, 'benchmarks/results/switch_whiten.csv')
    sweep(args, layers, ['mmsn-torch', 'BatchNorm2d'], 'SW layer benchmark')


if __name__ == '__main__':
    main()
