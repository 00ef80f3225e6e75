"""Train an mmdet or mmseg model from a config (the OpenMMLab tools/train.py, for both).

    python -m mmsn.tools.train CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                               [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]
                               [--norm SN|SyncSN|SW|SyncSW|GN|BN|SyncBN [--norm-heads]
                                [--pretrained FILE | --no-pretrained] [--sw-layers NAME]]
                               [--batch-size N]
"""
import argparse
import sys

from mmsn.mm.launch import common_arguments, norm_arguments, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector or segmentor with mmsn')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint, or from the latest one in '
                        'the work dir when no path is given')
    parser.add_argument('--amp', action='store_true', help='mixed precision training')
    common_arguments(parser)
    norm_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run(parse_args(argv), mode='train')


if __name__ == '__main__':
    sys.exit(main())
