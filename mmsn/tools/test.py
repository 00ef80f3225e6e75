"""Evaluate a checkpoint of an mmdet or mmseg model (the OpenMMLab tools/test.py, for both).

    python -m mmsn.tools.test CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
                              [--launcher none|pytorch|slurm|mpi]
"""
import argparse
import sys

from mmsn.mm.launch import common_arguments, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a detector or segmentor with mmsn')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run(parse_args(argv), mode='test')


if __name__ == '__main__':
    sys.exit(main())
