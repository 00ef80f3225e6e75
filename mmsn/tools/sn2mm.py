"""Convert an ImageNet SN / SSN / SW (or BN) ResNet v1 checkpoint to an mmdet/mmseg backbone.

    python -m mmsn.tools.sn2mm SRC DST [--sw-layers imagenet|segmentation|PATHS]

Prints one line per source tensor (its destination, or why it was dropped) and writes DST
(``state_dict`` + ``meta``) only when every tensor has a destination and every destination
is filled; otherwise lists the problems and exits with status 1.
"""
import argparse
import sys

from mmsn.checkpoint import add_trust_option
from mmsn.converters import ConversionError, convert_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src',
                        help="the released checkpoint (e.g. 'ResNet50v1+SN(8,32)-77.49.pth')")
    parser.add_argument('dst', help='the converted checkpoint to write')
    parser.add_argument('--sw-layers', default=None,
                        help="SW placement of the destination: 'imagenet' (7 layers), "
                             "'segmentation' (14) or comma-separated norm paths; default: the "
                             "source's own SW layers (none for SN/BN sources)")
    parser.add_argument('--sw-type', type=int, default=2,
                        help='sw_type of SW layers made from BN layers (default 2)')
    parser.add_argument('--num-pergroup', type=int, default=16,
                        help='channels per group of SW layers made from BN layers (default 16)')
    parser.add_argument('--ssn-as-sn', action='store_true',
                        help='SSN sources: SN layers whose softmax gives the sparse ratios '
                             '(default: SSN layers with the release buffers)')
    add_trust_option(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sw_layers = args.sw_layers
    if sw_layers and ',' in sw_layers:
        sw_layers = [p.strip() for p in sw_layers.split(',') if p.strip()]
    try:
        convert_checkpoint(args.src, args.dst, sw_layers, args.sw_type, args.num_pergroup,
                           args.ssn_as_sn, trusted=args.trust_checkpoint)
    except ConversionError as error:
        print(f'sn2mm: {args.src}: nothing written, {len(error.problems)} problem(s):',
              file=sys.stderr)
        for problem in error.problems:
            print(f'  {problem}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
