"""Draw what the SN/SW layers of a model learned, as in the papers.

    python -m mmsn.tools.plot_ratios CKPT_OR_WORKDIR --out-dir DIR

From a checkpoint (or the latest one of a work dir): stacked bars of every layer's mean and
variance ratios in layer order (SN Fig. 5/12) and the per-layer divergence between them,
D = KL(mean||var) + KL(var||mean) (SN Fig. 7c). From a work dir whose runs logged
``SwitchableRatioHook`` scalars (vis_data/scalars.json), also the ratio curves over training
(SN Fig. 7a-b, SW Fig. 6). Each figure as PNG and SVG; a summary table on stdout.
"""
import argparse
import glob
import os.path as osp
import sys

from mmsn.checkpoint import add_trust_option


def find_checkpoint(path: str) -> str:
    if osp.isfile(path):
        return path
    last = osp.join(path, 'last_checkpoint')
    if osp.isfile(last):
        with open(last) as f:
            return f.read().strip()
    checkpoints = sorted(glob.glob(osp.join(path, '*.pth')), key=osp.getmtime)
    if not checkpoints:
        raise FileNotFoundError(f'CKPT_OR_WORKDIR: no checkpoint in {path!r}')
    return checkpoints[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('source', metavar='CKPT_OR_WORKDIR')
    parser.add_argument('--out-dir', required=True)
    add_trust_option(parser)
    parser.add_argument('--curve-layers', type=int, default=12,
                        help='layers drawn in the training-curve figure (spread over the net)')
    args = parser.parse_args(argv)
    from mmsn.analysis import format_ratio_table, ratio_history, ratios_from_state_dict
    from mmsn.checkpoint import (DamagedCheckpointError, UntrustedCheckpointError,
                                 load_checkpoint_file)
    from mmsn.plotting import plot_divergence, plot_layer_ratios, plot_ratio_curves
    checkpoint_path = find_checkpoint(args.source)
    try:
        checkpoint = load_checkpoint_file(checkpoint_path, map_location='cpu',
                                         trusted=args.trust_checkpoint)
    except (DamagedCheckpointError, UntrustedCheckpointError) as error:
        print(error, file=sys.stderr)
        return 1
    state = checkpoint.get('state_dict', checkpoint)
    ratios = checkpoint.get('meta', {}).get('switchable_ratios') or ratios_from_state_dict(state)
    if not ratios:
        print(f'{checkpoint_path}: no SN/SW layers found', file=sys.stderr)
        return 1
    written = plot_layer_ratios(ratios, args.out_dir) + plot_divergence(ratios, args.out_dir)
    if osp.isdir(args.source):
        scalar_files = sorted(glob.glob(osp.join(args.source, '*', 'vis_data', 'scalars.json')))
        history = ratio_history(scalar_files)
        if history:
            written += plot_ratio_curves(history, args.out_dir, max_layers=args.curve_layers)
    print(f'{len(ratios)} layers from {checkpoint_path}')
    print(format_ratio_table(ratios, divergence=True))
    for path in written:
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
