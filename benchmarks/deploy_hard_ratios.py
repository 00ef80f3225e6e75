"""Inference time of a ResNet-50 with SN: soft ratios, hard ratios, and hard ratios deployed
(BN/BN layers folded into their convolutions, others keeping only the statistics they use),
against the BN ResNet-50 with its BN folded (mmcv fuse_conv_bn), all measured in one run.

    python benchmarks/deploy_hard_ratios.py [--batch 8] [--size 224] [--csv PATH]
"""
import argparse
import copy
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import add_smoke_option, measure, positive_int, report  # noqa: E402


def build(norm: str):
    import mmsn  # noqa: F401
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    model = MODELS.build(dict(type='ResNet', depth=50, norm_cfg=dict(type=norm), init_cfg=None))
    model.eval()  # (mmdet's ResNet.train returns None: no chaining)
    return model


def with_choices(model, bn_share: float, seed: int = 0):
    """Random ratio logits; ``bn_share`` of the layers pick BN for mean and variance."""
    from mmsn.layers.switch_norm import _SwitchNorm
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _SwitchNorm):
                module.mean_weight.copy_(torch.randn(3, generator=generator))
                module.var_weight.copy_(torch.randn(3, generator=generator))
                if torch.rand(1, generator=generator).item() < bn_share:
                    module.mean_weight[2] = module.var_weight[2] = 10.0
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=positive_int, default=8)
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--repeats', type=positive_int, default=5)
    parser.add_argument('--csv', default='benchmarks/results/deploy_hard_ratios.csv')
    add_smoke_option(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.repeats = 1, 32, 1
    from mmcv.cnn import fuse_conv_bn
    from mmsn.deploy import deploy_hard_switchable
    from mmsn.hard_ratios import harden_ratios
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    variants = {'BN, folded (fuse_conv_bn)': fuse_conv_bn(build('BN'))}
    for share in (0.5, 1.0):
        soft = with_choices(build('SN'), share)
        hard = copy.deepcopy(soft)
        choices = harden_ratios(hard)
        deployed = copy.deepcopy(hard)
        deploy_hard_switchable(deployed)
        bn_layers = sum(c == ('bn', 'bn') for c in choices.values())
        label = f'{bn_layers}/{len(choices)} BN/BN'
        if share == 0.5:
            variants['SN, soft ratios'] = soft
        variants[f'SN, hard ratios ({label})'] = hard
        variants[f'SN, hard, deployed ({label})'] = deployed
    rows = []
    soft_ms = None
    for name, model in variants.items():
        model.to(device)
        model.eval()
        with torch.no_grad():
            ms = measure(lambda: model(x), warmup=0 if args.smoke else 2,
                         repeats=args.repeats)
        soft_ms = ms if name == 'SN, soft ratios' else soft_ms
        rows.append(dict(model=name, batch=args.batch, size=args.size, dtype='float32',
                         ms=ms))
    for row in rows:
        row['vs soft SN'] = row['ms'] / soft_ms
    report(rows, args.csv, 'ResNet-50 inference (eval forward), hard-ratio deployment')


if __name__ == '__main__':
    main()
