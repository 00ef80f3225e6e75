"""Make the SN/SW ratios of a checkpoint one-hot (argmax per layer, mean and variance
separately), for finetuning with hard ratios (SN paper Table 3) or for deployment.

    python -m mmsn.tools.harden_ratios CKPT OUT
"""
import argparse
import sys

import torch

from mmsn.checkpoint import (DamagedCheckpointError, UntrustedCheckpointError, add_trust_option,
                             load_checkpoint_file)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    add_trust_option(parser)
    args = parser.parse_args(argv)
    from mmsn.analysis import ratios_from_state_dict
    from mmsn.hard_ratios import harden_state_dict
    try:
        checkpoint = load_checkpoint_file(args.checkpoint, map_location='cpu',
                                         trusted=args.trust_checkpoint)
    except (DamagedCheckpointError, UntrustedCheckpointError) as error:
        print(error, file=sys.stderr)
        return 1
    key = 'state_dict' if 'state_dict' in checkpoint else None
    state = checkpoint[key] if key else checkpoint
    try:
        hard = harden_state_dict(state)
    except ValueError as error:
        print(f'{args.checkpoint}: nothing written: {error}', file=sys.stderr)
        return 1
    ratios = ratios_from_state_dict(hard)
    if not ratios:
        print(f'{args.checkpoint}: no SN/SW layers found', file=sys.stderr)
        return 1
    for layer, entry in ratios.items():
        names = entry['statistics']
        mean = names[max(range(len(names)), key=entry['mean'].__getitem__)]
        var = names[max(range(len(names)), key=entry['var'].__getitem__)]
        print(f'{layer:<48} mean from {mean.upper():<3} variance from {var.upper()}')
    output = dict(checkpoint, state_dict=hard) if key else hard
    if key:
        output.setdefault('meta', {})['hard_ratios'] = True
        output.pop('optimizer', None)  # its momentum buffers belong to the soft logits
        output.get('meta', {}).pop('switchable_ratios', None)
    torch.save(output, args.out)
    print(f'wrote {args.out}: {len(ratios)} layers with one-hot ratios')
    return 0


if __name__ == '__main__':
    sys.exit(main())
