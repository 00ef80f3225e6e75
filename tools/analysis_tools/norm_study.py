"""Accuracy against batch size per norm, for any mmdet/mmseg config (the SN paper's Fig. 1
for your own model).

    python tools/analysis_tools/norm_study.py CONFIG --norms BN GN SN SyncSN \\
        --batch-sizes 8 2 1 [--nproc K] [--work-dir DIR] [--images N] [--metric KEY]
        [--norm-heads] [--no-pretrained] [--cfg-options k=v ...]

Runs the trainings one after another through ``tools/train.py --norm NORM --batch-size B``
(``tools/dist_train.sh`` when K > 1: every run on the same K processes, GPUs where there
are, else CPU processes), each for the same number of training images: an iteration-based
config trains ``ceil(images / (B K))`` iterations, its LR schedule stretched to match (an
epoch-based one keeps its epochs). It reads each run's final validation metrics, and writes
``study.md`` (table), ``study.csv`` and ``study.png`` (metric against batch size per norm)
to the work dir. Finished runs are kept (``<norm>_b<B>/result.json``): an interrupted
study, run again, resumes where it stopped (an unfinished run from its last checkpoint).
"""
import argparse
import csv
import json
import math
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmsn.mm.launch import DictAction  # noqa: E402
from mmsn.mm.norm_switch import NORM_CHOICES  # noqa: E402

#: keys of the training log, not metrics
_NOT_METRICS = ('step', 'iter', 'epoch', 'lr', 'time', 'data_time', 'memory', 'loss')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('--norms', nargs='+', choices=NORM_CHOICES, required=True)
    parser.add_argument('--batch-sizes', nargs='+', type=int, required=True,
                        help='images per process')
    parser.add_argument('--nproc', type=int, default=1, help='processes of every run')
    parser.add_argument('--work-dir', help='default: work_dirs/norm_study/<config name>')
    parser.add_argument('--images', type=int,
                        help='training images of every run (iteration-based configs); '
                        "default: the config's iterations at the largest batch size")
    parser.add_argument('--metric', help='the metric to plot (default: mIoU, '
                        'coco/bbox_mAP, or the first one found)')
    parser.add_argument('--norm-heads', action='store_true')
    parser.add_argument('--no-pretrained', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='passed to every run')
    args = parser.parse_args(argv)
    for name, values in (('--batch-sizes', args.batch_sizes), ('--nproc', [args.nproc])):
        if any(v < 1 for v in values):
            parser.error(f'{name}: expected positive ints, got {values}')
    return args


#: iteration counts of a scheduler, stretched with the schedule
_SCHEDULE_KEYS = ('begin', 'end', 'T_max')


def run_config(config: str, options: Dict, images: Optional[int], largest: int, nproc: int,
               batch: int, out: str) -> Dict:
    """Writes the run's config (``options`` merged; its iterations, schedule and checkpoint
    interval for ``images`` training images) to ``out`` and returns its iteration plan."""
    from mmengine.config import Config
    from mmsn.mm.batch_size import base_batch_size
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options)
    loop = cfg.train_cfg
    plan = dict(images=None, iters=None, epochs=loop.get('max_epochs'))
    # the config's total batch size, kept known once it is saved under another name
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=base_batch_size(cfg, config)[0])
    if 'max_iters' in loop:
        images = images or loop.max_iters * largest * nproc
        iters = math.ceil(images / (batch * nproc))
        factor = iters / loop.max_iters
        loop.max_iters = iters
        loop.val_interval = iters
        for scheduler in cfg.get('param_scheduler') or []:
            if scheduler.get('by_epoch', True):
                continue
            for key in _SCHEDULE_KEYS:
                if key in scheduler:
                    scheduler[key] = min(round(scheduler[key] * factor), iters)
            if 'milestones' in scheduler:
                scheduler['milestones'] = [round(m * factor) for m in scheduler.milestones]
        checkpoint = cfg.default_hooks.get('checkpoint')
        if checkpoint is not None:
            interval = round(checkpoint.get('interval', loop.max_iters) * factor)
            checkpoint.interval = max(1, min(interval, iters))
        plan.update(images=images, iters=iters)
    elif images is not None:
        raise ValueError(f'--images: expected an iteration-based config (an epoch-based one '
                         f'sees its dataset per epoch at every batch size), got '
                         f'{loop.get("type")}')
    cfg.dump(out)
    return plan


def final_metrics(run_dir: str, step: Optional[int]) -> Dict[str, float]:
    """The last validation record of the run's newest log (mmengine's ``scalars.json``;
    training records carry ``lr``), which must be at ``step`` when given."""
    logs = sorted(
        (osp.join(run_dir, d, 'vis_data', 'scalars.json') for d in os.listdir(run_dir)
         if osp.isfile(osp.join(run_dir, d, 'vis_data', 'scalars.json'))),
        key=osp.getmtime)
    for log in reversed(logs):
        records = [json.loads(line) for line in open(log) if line.strip()]
        for record in reversed(records):
            if 'lr' in record:
                continue
            if step is not None and record.get('step') != step:
                break
            metrics = {k: v for k, v in record.items()
                       if not k.startswith(_NOT_METRICS) and isinstance(v, (int, float))}
            if metrics:
                return metrics
    raise RuntimeError(f'{run_dir}: no validation metrics at the final iteration ({step}) in '
                       'its logs; delete the run directory to train it again')


def train(args, norm: str, batch: int, run_dir: str, images: Optional[int]) -> Dict:
    os.makedirs(run_dir, exist_ok=True)
    config = osp.join(run_dir, 'config.py')
    plan = run_config(args.config, args.cfg_options, images, max(args.batch_sizes),
                      args.nproc, batch, config)
    options = ['--norm', norm, '--batch-size', str(batch), '--work-dir', run_dir]
    options += ['--norm-heads'] if args.norm_heads else []
    options += ['--no-pretrained'] if args.no_pretrained else []
    if osp.isfile(osp.join(run_dir, 'last_checkpoint')):
        options.append('--resume')
    if args.nproc > 1:
        command = ['bash', osp.join(ROOT, 'tools/dist_train.sh'), config, str(args.nproc)]
    else:
        command = [sys.executable, osp.join(ROOT, 'tools/train.py'), config]
    print(f'[norm_study] {norm}, {args.nproc} x {batch} images per step: '
          + ' '.join(command + options), flush=True)
    with open(osp.join(run_dir, 'train.log'), 'a') as log:
        result = subprocess.run(command + options, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f'{norm} at batch {batch}: training failed (exit '
                           f'{result.returncode}); see {osp.join(run_dir, "train.log")}')
    return dict(norm=norm, batch_size=batch, nproc=args.nproc, **plan,
                settings=settings(args), metrics=final_metrics(run_dir, plan['iters']))


def settings(args) -> Dict:
    """What a finished run must share with the study to be kept."""
    return dict(config=osp.abspath(args.config), images=args.images, nproc=args.nproc,
                norm_heads=args.norm_heads, no_pretrained=args.no_pretrained,
                cfg_options={k: str(v) for k, v in args.cfg_options.items()})


def pick_metric(results: List[Dict], wanted: Optional[str]) -> str:
    names = [k for r in results for k in r['metrics']]
    if wanted:
        if wanted not in names:
            raise ValueError(f'--metric: expected one of {sorted(set(names))}, got {wanted!r}')
        return wanted
    for name in ('mIoU', 'coco/bbox_mAP', 'coco/segm_mAP'):
        if name in names:
            return name
    print(f'[norm_study] plotting {names[0]} (of {sorted(set(names))}; --metric picks one)')
    return names[0]


def write_outputs(results: List[Dict], metric: str, norms: List[str], batches: List[int],
                  out_dir: str) -> List[str]:
    """``study.md``, ``study.csv`` and ``study.png``; returns the table's lines."""
    by_key = {(r['norm'], r['batch_size']): r for r in results}
    order = sorted(set(batches), reverse=True)
    lines = [f'| norm | ' + ' | '.join(f'{b}/process' for b in order) + ' |',
             '| --- |' + ' --- |' * len(order)]
    for norm in norms:
        cells = [f'{by_key[norm, b]["metrics"][metric]:.2f}'
                 if metric in by_key.get((norm, b), {}).get('metrics', {}) else '-'
                 for b in order]
        lines.append(f'| {norm} | ' + ' | '.join(cells) + ' |')
    with open(osp.join(out_dir, 'study.md'), 'w') as f:
        f.write(f'{metric}, {results[0]["nproc"]} processes\n\n' + '\n'.join(lines) + '\n')
    with open(osp.join(out_dir, 'study.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['norm', 'batch_per_process', 'processes', 'iterations', 'images',
                         'metric', 'value'])
        for r in results:
            writer.writerow([r['norm'], r['batch_size'], r['nproc'], r['iters'], r['images'],
                             metric, r['metrics'].get(metric)])
    from mmsn.plotting import _pyplot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for norm in norms:
        points = sorted((b, by_key[norm, b]['metrics'][metric]) for b in batches
                        if metric in by_key.get((norm, b), {}).get('metrics', {}))
        axis.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=norm)
    axis.set_xscale('log', base=2)
    axis.set_xticks(order)
    axis.set_xticklabels([str(b) for b in order])
    axis.invert_xaxis()
    axis.set_xlabel('images per process')
    axis.set_ylabel(metric)
    axis.legend()
    figure.tight_layout()
    figure.savefig(osp.join(out_dir, 'study.png'), dpi=120)
    plt.close(figure)
    return lines


def main(argv=None):
    args = parse_args(argv)
    work_dir = args.work_dir or osp.join(
        'work_dirs', 'norm_study', osp.splitext(osp.basename(args.config))[0])
    os.makedirs(work_dir, exist_ok=True)
    results = []
    for norm in args.norms:
        for batch in args.batch_sizes:
            run_dir = osp.join(work_dir, f'{norm}_b{batch}')
            done = osp.join(run_dir, 'result.json')
            if osp.isfile(done):
                with open(done) as f:
                    result = json.load(f)
                if result.get('settings') != settings(args):
                    raise ValueError(f'{run_dir}: finished with other settings '
                                     f'({result.get("settings")}); use another --work-dir')
                print(f'[norm_study] {norm} at batch {batch}: done before, kept', flush=True)
                results.append(result)
                continue
            result = train(args, norm, batch, run_dir, args.images)
            with open(done, 'w') as f:
                json.dump(result, f, indent=1)
            results.append(result)
    metric = pick_metric(results, args.metric)
    for line in write_outputs(results, metric, args.norms, args.batch_sizes, work_dir):
        print(line)
    print(f'[norm_study] wrote {work_dir}/study.md, study.csv, study.png')


if __name__ == '__main__':
    main()
