"""Resuming the demo trainings from the middle checkpoint of a run ends bitwise where the
uninterrupted run ends (weights, ratio logits, running statistics, num_batches_tracked,
optimizer and scheduler state): iteration loops with validation at the checkpoint, an epoch
loop, through our tools/train.py and mmdet's and mmseg's own, SSN with its radius schedule
(FCN, one process), SyncSN on two processes (FCN), with dropout where the model draws no other
random numbers; and the checkpoints load with weights_only, no fallback, no warning."""
import os
import os.path as osp
import re
import shutil
import signal
import sys
import time

import pytest
import torch

from mmsn.checkpoint import load_checkpoint_file
from processes import Job, run_job

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEGMENTATION = 'configs/demo/fcn_r18-sn_shapes.py'
DETECTION = 'configs/demo/mask-rcnn_r18-sn_fpn-sn_shapes.py'

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (osp.isdir(osp.join(ROOT, 'configs')) and
         __import__('importlib').util.find_spec('mmseg') is not None),
    reason='needs mmseg and mmdet (make test installs them)')]


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from mmsn.demo.shapes import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('resume') / 'shapes')
    make_shapes_dataset(root, num_train=8, num_val=2)
    return root


def options(config, shapes, epochs=False):
    found = [f'{loader}.dataset.data_root={shapes}/'
             for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    if 'mask-rcnn' in osp.basename(config):
        ann = f'{shapes}/annotations/instances_val.json'
        found += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    found += ['train_dataloader.batch_size=2', 'default_hooks.logger.interval=1']
    if epochs:  # the config sets the loop: 2 epochs of 4 iterations
        return found
    # 4 iterations of 2 images, a checkpoint and a validation every 2
    return found + ['train_cfg.max_iters=4', 'train_cfg.val_interval=2',
                    'default_hooks.checkpoint.interval=2']


def train_command(config, work_dir, shapes, *args, tool='tools/train.py', extra=(), nproc=1,
                  epochs=False):
    if nproc > 1:
        command = ['bash', 'tools/dist_train.sh', config, str(nproc)]
    else:
        command = [sys.executable, tool, config]
    return command + ['--work-dir', str(work_dir), *args, '--cfg-options',
                      *options(config, shapes, epochs), *extra]


def train_env(port_offset=0):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS='default',
               PORT=str(29500 + (os.getpid() + port_offset) % 1000))
    env.pop('MMSN_TRUSTED_CHECKPOINTS', None)
    return env


def train(config, work_dir, shapes, *args, timeout=240, port_offset=0, **kwargs):
    """Trains to the end within ``timeout`` seconds (a hung job is killed with its process
    group) and returns the log."""
    return run_job(train_command(config, work_dir, shapes, *args, **kwargs), timeout,
                   f'{work_dir}.log', cwd=ROOT, env=train_env(port_offset))


def resume_from_iteration_2(first_run, work_dir, name='iter_2.pth'):
    """A work dir holding only the uninterrupted run's middle checkpoint."""
    os.makedirs(work_dir)
    checkpoint = osp.join(work_dir, name)
    shutil.copy(osp.join(first_run, name), checkpoint)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(checkpoint)
    return checkpoint


def differences(expected_path, resumed_path):
    """Names of the tensors (model state and optimizer state) that differ."""
    expected = load_checkpoint_file(expected_path)
    resumed = load_checkpoint_file(resumed_path)
    found = [k for k, v in expected['state_dict'].items()
             if not torch.equal(v, resumed['state_dict'][k])]
    for index, state in expected['optimizer']['state'].items():
        found += [f'optimizer.{index}.{k}' for k, v in state.items()
                  if not torch.equal(v, resumed['optimizer']['state'][index][k])]
    if expected['optimizer']['param_groups'] != resumed['optimizer']['param_groups']:
        found.append('optimizer.param_groups')
    if expected['param_schedulers'] != resumed['param_schedulers']:
        found.append('param_schedulers')
    return found


def assert_resumed_safely(log, where='epoch: 0, iter: 2'):
    assert f'resumed {where}' in log
    assert 'weights_only' not in log and 'Unsupported global' not in log
    assert 'RandomStateHook' not in log.split('resumed')[-1]  # restored, no warning


def upstream_tool(package):
    return osp.join(osp.dirname(__import__(package).__file__), '.mim', 'tools', 'train.py')


DROPOUT = ['model.decode_head.dropout_ratio=0.1']  # FCN then draws from torch's generator


def test_detection_resumes_bitwise_only_with_the_random_state(tmp_path, shapes):
    """Mask R-CNN samples RPN/R-CNN proposals with torch's generator: RandomStateHook's
    saved state is what makes the resumed run equal (without it, most tensors differ)."""
    first = tmp_path / 'uninterrupted'
    train(DETECTION, first, shapes)
    assert 'mmsn_random_state' in load_checkpoint_file(str(first / 'iter_2.pth'))
    resumed = tmp_path / 'resumed'
    checkpoint = resume_from_iteration_2(first, resumed)
    assert_resumed_safely(train(DETECTION, resumed, shapes, '--resume', checkpoint))
    assert differences(first / 'iter_4.pth', resumed / 'iter_4.pth') == []
    without = tmp_path / 'without_hook'
    checkpoint = resume_from_iteration_2(first, without)
    config = derived_config(tmp_path, DETECTION, 'custom_hooks = []\n')
    train(config, without, shapes, '--resume', checkpoint)
    assert len(differences(first / 'iter_4.pth', without / 'iter_4.pth')) > 10


def test_detection_epoch_loop_resumes_bitwise_with_mmdets_train_py(tmp_path, shapes):
    """mmdet's COCO configs train by epochs: resumed at an epoch's start, no replay."""
    config = derived_config(
        tmp_path, DETECTION,
        "train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=2, "
        "val_interval=1)\n"
        "default_hooks = dict(checkpoint=dict(by_epoch=True, interval=1))\n")
    first = tmp_path / 'uninterrupted'
    train(config, first, shapes, epochs=True)
    resumed = tmp_path / 'resumed'
    resume_from_iteration_2(first, resumed, name='epoch_1.pth')
    log = train(config, resumed, shapes, '--resume', tool=upstream_tool('mmdet'), epochs=True)
    assert_resumed_safely(log, where='epoch: 1, iter: 4')
    assert differences(first / 'epoch_2.pth', resumed / 'epoch_2.pth') == []


def derived_config(tmp_path, base, body):
    config = tmp_path / f'derived_{osp.basename(base)}'
    config.write_text(f"_base_ = '{osp.join(ROOT, base)}'\n" + body)
    return str(config)


def test_ssn_radius_schedule_resumes_bitwise(tmp_path, shapes):
    config = derived_config(
        tmp_path, SEGMENTATION,
        "norm_cfg = dict(type='SSN')\n"
        "model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg))\n"
        "custom_hooks = [dict(type='RandomStateHook'),\n"
        "                dict(type='SSNRadiusHook', max_radius=1.0, end=3)]\n")
    first = tmp_path / 'uninterrupted'
    train(config, first, shapes, extra=DROPOUT)
    final = load_checkpoint_file(str(first / 'iter_4.pth'))['state_dict']
    assert float(final['backbone.stem.1.radius']) == 1.0
    assert int(final['backbone.stem.1.mean_fixed']) == 1  # one-hot and frozen by the end
    resumed = tmp_path / 'resumed'  # through mmseg's own tools/train.py, --resume finding
    resume_from_iteration_2(first, resumed)  # the latest checkpoint of the work dir
    assert_resumed_safely(train(config, resumed, shapes, '--resume',
                                tool=upstream_tool('mmseg'), extra=DROPOUT))
    assert differences(first / 'iter_4.pth', resumed / 'iter_4.pth') == []


@pytest.mark.timeout(600)
def test_two_process_syncsn_training_resumes_bitwise(tmp_path, shapes):
    """Also after a rank is killed (SIGKILL) mid-training: the job ends within seconds,
    torchrun naming the rank, and resuming from the killed run's checkpoint ends where the
    uninterrupted run ends."""
    extra = ['model.backbone.norm_cfg.type=SyncSN', 'model.decode_head.norm_cfg.type=SyncSN',
             *DROPOUT]
    first = tmp_path / 'uninterrupted'
    train(SEGMENTATION, first, shapes, nproc=2, extra=extra)
    saved = load_checkpoint_file(str(first / 'iter_2.pth'))['mmsn_random_state']
    assert saved['iter'] == 2 and len(saved['states']) == 2  # both processes' generators
    resumed = tmp_path / 'resumed'
    checkpoint = resume_from_iteration_2(first, resumed)
    assert_resumed_safely(train(SEGMENTATION, resumed, shapes, '--resume', checkpoint, nproc=2,
                                extra=extra, port_offset=1))
    assert differences(first / 'iter_4.pth', resumed / 'iter_4.pth') == []

    killed = tmp_path / 'killed'  # the same run, meant to go on for 1000 iterations
    job = Job(train_command(SEGMENTATION, killed, shapes, nproc=2,
                            extra=extra + ['train_cfg.max_iters=1000']),
              f'{killed}.log', cwd=ROOT, env=train_env(port_offset=2))
    try:
        deadline = time.monotonic() + 180
        while not osp.exists(killed / 'last_checkpoint'):  # iteration 2 is saved
            assert job.process.poll() is None, job.output()[-3000:]
            assert time.monotonic() < deadline, job.output()[-3000:]
            time.sleep(0.05)
        os.kill(job.rank_pid(1), signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(timeout=60)
        ended = time.monotonic() - killed_at
    finally:
        job.kill()
    log = job.output()
    assert code != 0 and ended < 15, (ended, log[-3000:])
    assert re.search(r'rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9', log), log[-3000:]
    assert_resumed_safely(train(SEGMENTATION, killed, shapes, '--resume',
                                str(killed / 'iter_2.pth'), nproc=2, extra=extra,
                                port_offset=3))
    assert differences(first / 'iter_4.pth', killed / 'iter_4.pth') == []
