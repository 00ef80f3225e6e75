"""Replace the running statistics of every SN/SW layer of a checkpoint by the average batch
statistics of K training mini-batches (SN paper Sec. 3.2), and save the result.

    python -m mmsn.tools.batch_average CONFIG CHECKPOINT OUT [--num-batches 200]
        [--cfg-options k=v ...] [--launcher pytorch]     # or tools/dist_*-style torchrun

The network is frozen (no weight changes; SN/SW layers in train mode only to see batch
statistics). In distributed runs each process feeds K batches and the averages are averaged.
"""
import argparse
import os
import sys

from mmsn.mm.launch import build_runner, common_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out', help='where to save the checkpoint with averaged statistics')
    parser.add_argument('--num-batches', type=int, default=200)
    common_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.dist import get_rank
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu
    from mmsn.batch_average import batch_average_statistics
    runner = build_runner(args, mode='test')
    runner.load_or_resume()
    loader = Runner.build_dataloader(runner.cfg.train_dataloader, seed=runner.seed)
    model = runner.model
    used = batch_average_statistics(model, loader, model.val_step, args.num_batches)
    if get_rank() == 0:
        meta = dict(batch_average=dict(num_batches=used, source=args.checkpoint))
        save_checkpoint(dict(meta=meta, state_dict=weights_to_cpu(get_state_dict(model))),
                        args.out)
        print(f'averaged the SN/SW running statistics over {used} batches per process; '
              f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
