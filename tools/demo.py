"""mmsn's main job on embedded data: train and evaluate a small SN detector and segmentor.

Generates the shapes dataset (mmsn/demo/shapes.py) under ``data/shapes``, trains Mask R-CNN
(ResNet-18, SN in backbone, FPN and mask head) and FCN (ResNet-18, SN in backbone and head)
with tools/train.py, prints box/mask AP and mIoU, and writes each model's learned SN ratios
per layer to the work directory. About ten minutes on 2 CPU cores; unchanged on a GPU.
With the shipped schedule (no ``--cfg-options``) it checks its figures against
:data:`EXPECTED_FIGURES` and exits with 1 outside them.

    python tools/demo.py [--work-dir work_dirs/demo] [--cfg-options k=v ...]
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = {
    'detection': ('configs/demo/mask-rcnn_r18-sn_fpn-sn_shapes.py',
                  {'coco/bbox_mAP': 'box AP', 'coco/segm_mAP': 'mask AP'}),
    'segmentation': ('configs/demo/fcn_r18-sn_shapes.py', {'mIoU': 'mIoU'}),
}


#: The figures a trained demo model reaches on any CPU, and an untrained or broken one cannot.
#: Seen across machines (floating-point results differ between CPUs, so the runs do):
#: box AP 0.465-0.469, mask AP 0.497-0.515, mIoU 79.10-80.46 (README, "The demo"). Untrained
#: (or with broken normalization) the APs stay near 0 and mIoU near 22 (background alone).
EXPECTED_FIGURES = {'box AP': (0.40, 0.60), 'mask AP': (0.40, 0.65), 'mIoU': (72.0, 90.0)}


def check_figures(summary: dict) -> list:
    """Lines naming each figure of ``summary`` outside :data:`EXPECTED_FIGURES`."""
    wrong = []
    for task, values in summary.items():
        for name, value in values.items():
            if name in EXPECTED_FIGURES:
                low, high = EXPECTED_FIGURES[name]
                if not low <= value <= high:
                    wrong.append(f'{task} {name} = {value:.3f}: expected {low} to {high}')
    return wrong


def final_metrics(work_dir: str) -> dict:
    """The last validation metrics the runner logged (vis_data/scalars.json)."""
    metrics = {}
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if any(k.startswith(('coco/', 'mIoU')) for k in record):
                    metrics = record
    return metrics


def last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/shapes')
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='passed to tools/train.py for every task')
    args = parser.parse_args()
    os.chdir(ROOT)

    from mmsn.analysis import format_ratio_table, ratios_from_state_dict
    from mmsn.checkpoint import load_checkpoint_file
    from mmsn.demo.shapes import make_shapes_dataset
    counts = make_shapes_dataset(args.data_root)
    print(f'[demo] shapes dataset in {args.data_root}: {counts}', flush=True)

    summary = {}
    for task in args.tasks:
        config, wanted = TASKS[task]
        work_dir = osp.join(args.work_dir, task)
        command = [sys.executable, 'tools/train.py', config, '--work-dir', work_dir]
        options = [f'train_dataloader.dataset.data_root={args.data_root}/',
                   f'val_dataloader.dataset.data_root={args.data_root}/',
                   f'test_dataloader.dataset.data_root={args.data_root}/'] + args.cfg_options
        if task == 'detection':
            ann = f'{args.data_root}/annotations/instances_val.json'
            options += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
        command += ['--cfg-options'] + options
        print(f'[demo] training {task}: {" ".join(command)}', flush=True)
        start = time.time()
        subprocess.run(command, check=True)
        metrics = final_metrics(work_dir)
        missing = [k for k in wanted if k not in metrics]
        if missing:
            raise RuntimeError(f'{task}: the run logged no {missing} in {work_dir}')
        checkpoint = load_checkpoint_file(last_checkpoint(work_dir), map_location='cpu')
        ratios = ratios_from_state_dict(checkpoint['state_dict'])
        ratio_file = osp.join(work_dir, 'sn_ratios.json')
        with open(ratio_file, 'w') as f:
            json.dump(ratios, f, indent=1)
        print(f'[demo] {task}: learned SN ratios of {len(ratios)} layers -> {ratio_file}')
        print(format_ratio_table(ratios, max_rows=12))
        plots = osp.join(work_dir, 'ratio_plots')
        subprocess.run([sys.executable, 'tools/analysis_tools/plot_ratios.py', work_dir,
                        '--out-dir', plots], check=True, stdout=subprocess.DEVNULL)
        print(f'[demo] {task}: ratio figures (bars, curves over training, divergence) in '
              f'{plots}')
        summary[task] = dict({wanted[k]: metrics[k] for k in wanted},
                             minutes=(time.time() - start) / 60)

    print('\n[demo] results on the shapes validation split')
    for task, values in summary.items():
        print(f'  {task:<13} ' + '  '.join(
            f'{k}={v:.3f}' if k != 'minutes' else f'({v:.1f} min)' for k, v in values.items()))
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    if args.cfg_options:
        print('[demo] --cfg-options changed the runs: figures not checked')
        return
    wrong = check_figures(summary)
    if wrong:
        print('[demo] FAILED: figures outside what a trained demo model reaches:\n  ' +
              '\n  '.join(wrong), flush=True)
        sys.exit(1)
    print('[demo] figures within the expected ranges '
          f'({", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in EXPECTED_FIGURES.items())})')


if __name__ == '__main__':
    main()
