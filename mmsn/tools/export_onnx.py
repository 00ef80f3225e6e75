"""Export a segmentor's logits or a detector's backbone and neck, SN/SW included, to ONNX.

An mmseg or mmdet config and checkpoint in; the file is checked (standard operators only) and
compared with PyTorch in onnxruntime.

    python -m mmsn.tools.export_onnx CONFIG [CHECKPOINT] [--out FILE] [--shape H W]
        [--batch N] [--device cpu|cuda] [--dynamic] [--fold-hard] [--opset N]
        [--exporter torchscript|dynamo] [--no-verify] [--cfg-options k=v ...]

Without a checkpoint the model's random initialisation is exported (with a warning). See
docs/onnx.md and :mod:`mmsn.mm.onnx_export`.
"""
import argparse
import os.path as osp
import sys

from mmsn.checkpoint import DamagedCheckpointError, UntrustedCheckpointError, add_trust_option
from mmsn.mm.launch import DictAction
from mmsn.mm.onnx_checks import DEFAULT_ATOL, DEFAULT_RTOL, OnnxExportError
from mmsn.mm.onnx_export import DEFAULT_OPSET, EXPORTERS, export_onnx


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='an mmseg or mmdet config file')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint file (omitted: random weights, with a warning)')
    parser.add_argument('--out', help='the ONNX file to write (default: the config name with '
                        '.onnx, in the current directory)')
    parser.add_argument('--shape', type=int, nargs=2, default=[512, 512],
                        metavar=('H', 'W'), help='input height and width (default: 512 512)')
    parser.add_argument('--batch', type=int, default=1, help='input batch size (default: 1)')
    parser.add_argument('--device', default='cpu',
                        help='where the model is built and traced (default: cpu)')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch, height and width')
    parser.add_argument('--fold-hard', action='store_true',
                        help='fold the SN/SW layers with one-hot ratios first '
                        '(mmsn.deploy.deploy_hard_switchable; see mmsn-harden-ratios)')
    parser.add_argument('--exporter', choices=EXPORTERS, default='torchscript',
                        help='torch.onnx.export with dynamo=False (default, fast) or '
                        'dynamo=True (needs onnxscript; SW with sw_type=5)')
    parser.add_argument('--opset', type=int,
                        help='ai.onnx opset (default: '
                        + ', '.join(f'{k} {v}' for k, v in DEFAULT_OPSET.items()) + ')')
    parser.add_argument('--no-verify', action='store_true',
                        help='do not compare onnxruntime with PyTorch')
    parser.add_argument('--atol', type=float, default=DEFAULT_ATOL,
                        help=f'comparison tolerance, absolute part (default: {DEFAULT_ATOL:g})')
    parser.add_argument('--rtol', type=float, default=DEFAULT_RTOL,
                        help=f'comparison tolerance, relative part (default: {DEFAULT_RTOL:g})')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config settings, key=value pairs (xxx=yyy)')
    add_trust_option(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or f'{osp.splitext(osp.basename(args.config))[0]}.onnx'
    try:
        report = export_onnx(
            args.config, args.checkpoint, out, cfg_options=args.cfg_options,
            device=args.device, trust_checkpoint=args.trust_checkpoint,
            fold_hard=args.fold_hard, shape=tuple(args.shape), batch=args.batch,
            dynamic=args.dynamic, exporter=args.exporter, opset=args.opset,
            verify=not args.no_verify, atol=args.atol, rtol=args.rtol)
    except (ValueError, FileNotFoundError, ImportError, DamagedCheckpointError,
            UntrustedCheckpointError, OnnxExportError) as error:
        # what the user can act on, without a traceback
        print(f'export_onnx: {error}', file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
