"""ResNet-50 training steps with every norm BN, GN(32) or SN, and with BN plus the SW
release's 7 SW layers: time per step and peak memory, as ratios to BN in the same run.

    python benchmarks/bench_resnet50_step.py [--batch 32] [--size 224] [--compile]
        [--kinds bn gn sn sw7 sn@torch ...] [--csv PATH] [--smoke]

bf16 autocast and channels_last on a GPU; float32 on the CPU. Needs only torch (+ triton):
the ResNet-50 (v1, torchvision layout) is built here. A kind may end in ``@torch`` or
``@triton`` to force mmsn's backend (``MMSN_BACKEND``): eagerly, ``sn@torch`` is the reference
path; with ``--compile``, ``sn`` is inductor's code for the reference and ``sn@triton`` mmsn's
kernels as custom ops.
"""
import argparse
import os.path as osp
import sys

import torch
from torch import nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import add_smoke_option, measure, mmsn_backend, positive_int, report  # noqa: E402

STAGES = (3, 4, 6, 3)
# the SW release's placement: the stem and norm2 of odd-indexed blocks of stages 1-3
SW7 = {'stem'} | {(s, b, 2) for s, blocks in enumerate(STAGES[:3]) for b in range(1, blocks, 2)}


def norm_factory(kind: str):
    import mmsn

    def make(where, channels):
        if kind == 'bn' or (kind == 'sw7' and where not in SW7):
            return nn.BatchNorm2d(channels)
        if kind == 'gn':
            return nn.GroupNorm(min(32, channels), channels)
        if kind == 'sn':
            return mmsn.SwitchNorm2d(channels)
        return mmsn.SwitchWhiten2d(channels, num_pergroup=16, sw_type=2, T=5)
    return make


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride, norm, where):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.norm1 = norm(where + (1,), planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.norm2 = norm(where + (2,), planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.norm3 = norm(where + (3,), planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            norm(where + ('shortcut',), planes * 4))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(kind: str, width: int = 64) -> nn.Module:
    """ResNet-50 v1; ``width`` < 64 makes every layer narrower (the smoke run)."""
    norm = norm_factory(kind)
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), norm('stem', width),
              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    inplanes = width
    for s, blocks in enumerate(STAGES):
        for b in range(blocks):
            planes = width * 2 ** s
            layers.append(Bottleneck(inplanes, planes, 2 if (b == 0 and s) else 1, norm, (s, b)))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, 1000)]
    return nn.Sequential(*layers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=positive_int, default=32)
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--kinds', nargs='+', default=['bn', 'gn', 'sn', 'sw7'])
    parser.add_argument('--repeats', type=positive_int, default=10)
    parser.add_argument('--compile', action='store_true', help='torch.compile each model')
    parser.add_argument('--csv', default='benchmarks/results/resnet50_step.csv')
    add_smoke_option(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # one step at 32x32, a quarter of the width, of the baselines and of the
        # kernel path (what a GPU runs for 'sn' and 'sw7'; tests/test_compile covers compile)
        args.batch, args.size, args.repeats = 2, 32, 1
        args.kinds = ['bn', 'gn', 'sn@triton', 'sw7@triton']
    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    rows = []
    for kind in args.kinds:
        norm, _, backend = kind.partition('@')
        model = resnet50(norm, width=16 if args.smoke else 64).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        forward = torch.compile(model) if args.compile else model

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = nn.functional.cross_entropy(forward(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with mmsn_backend(backend):
            ms = measure(step, warmup=0 if args.smoke else 3, repeats=args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float('nan')
        rows.append(dict(model=f'ResNet-50 {kind}', batch=args.batch, size=args.size,
                         compiled=args.compile,
                         dtype='bf16 autocast' if cuda else 'float32', ms=ms, peak_MiB=peak))
    base = next((r for r in rows if r['model'].endswith(' bn')), rows[0])
    for row in rows:
        row['time_vs_BN'] = row['ms'] / base['ms']
        row['memory_vs_BN'] = row['peak_MiB'] / base['peak_MiB'] if cuda else float('nan')
    report(rows, args.csv, 'ResNet-50 training step')


if __name__ == '__main__':
    main()
