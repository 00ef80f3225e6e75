"""The demo: its configs build and step, and the distributed tools train and test on the CPU."""
import glob
import json
import os
import os.path as osp
import signal
import sys
import time

import pytest
import torch

from mmsn.checkpoint import load_checkpoint_file
from processes import Job, run_job

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# Norm layers: ResNet-18 (stem, 16 block norms, 3 shortcuts) + FPN (4 lateral, 4 output) +
# mask head (4 convs); ResNetV1c-18 (3 deep-stem norms, 16, 3) + FCN head (3 convs).
DEMO_CONFIGS = {
    'configs/demo/mask-rcnn_r18-sn_fpn-sn_shapes.py': ('mmdet', {'SwitchNorm2d': 32}),
    'configs/demo/fcn_r18-sn_shapes.py': ('mmseg', {'SwitchNorm2d': 25}),
}


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    from mmsn.demo.shapes import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('shapes'))
    make_shapes_dataset(root, num_train=8, num_val=4)
    return root


def load_config(path, data_root):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, path))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root + '/'
        cfg[loader].batch_size = 2
    if 'ann_file' in cfg.val_evaluator:
        cfg.val_evaluator.ann_file = data_root + '/annotations/instances_val.json'
    return cfg


def count_switchable(model):
    from mmsn.layers import SwitchableLayer
    counts = {}
    for module in model.modules():
        if isinstance(module, SwitchableLayer):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize('config', sorted(DEMO_CONFIGS))
def test_demo_config_builds_steps_and_predicts(config, shapes_root):
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DATASETS, MODELS, init_default_scope
    scope, expected_layers = DEMO_CONFIGS[config]
    cfg = load_config(config, shapes_root)
    init_default_scope(scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert count_switchable(model) == expected_layers
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = pseudo_collate([dataset[0], dataset[1]])
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    losses = model.train_step(batch, optim_wrapper)  # forward, backward, SGD step
    assert losses and all(torch.isfinite(v).all() for v in losses.values())
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # The ratio logits received gradients and moved: all of the stem's, and most outside the
    # residual branches (inside them zero-init residual scales block every gradient at the
    # first step; an FPN level that no sampled anchor uses gets none either).
    logits = [k for k in before if k.endswith(('mean_weight', 'var_weight'))]
    stem = [k for k in logits if k.startswith(('backbone.sn1.', 'backbone.stem.'))]
    outside = [k for k in logits if '.layer' not in k]
    assert stem and all(k in changed for k in stem)
    assert sum(k in changed for k in outside) >= 0.75 * len(outside)
    model.eval()
    val_set = DATASETS.build(cfg.val_dataloader.dataset)
    with torch.no_grad():
        outputs = model.val_step(pseudo_collate([val_set[0]]))
    assert len(outputs) == 1


def job_env(port_offset=0):
    """Environment of a job: its own torchrun port (tests of several jobs, or several
    suites on one machine, do not collide)."""
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHON=sys.executable,
                PORT=str(29000 + (os.getpid() + port_offset) % 1000))


def run(command, log_path, timeout, port_offset=0):
    return run_job(command, timeout, str(log_path), cwd=ROOT, env=job_env(port_offset))


def sync_sn_options(shapes_root, *extra):
    data = [f'{loader}.dataset.data_root={shapes_root}/'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    return data + ['model.backbone.norm_cfg.type=SyncSN', 'model.decode_head.norm_cfg.type=SyncSN',
                   'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1', *extra]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dist_train_two_cpu_processes_with_sync_sn_then_test(shapes_root, tmp_path):
    work_dir = str(tmp_path / 'work')
    data = [f'{loader}.dataset.data_root={shapes_root}/'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    options = sync_sn_options(shapes_root, 'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
                              'default_hooks.checkpoint.interval=4')
    log = run(['bash', 'tools/dist_train.sh', 'configs/demo/fcn_r18-sn_shapes.py', '2',
               '--work-dir', work_dir, '--cfg-options'] + options, tmp_path / 'train.log', 200)
    assert 'Iter(train) [4/4]' in log and "type='SyncSN'" in log
    assert 'gloo threads still running' not in log  # (the process group ended in order)
    checkpoint = osp.join(work_dir, 'iter_4.pth')
    assert osp.exists(checkpoint)
    state = load_checkpoint_file(checkpoint, map_location='cpu')['state_dict']
    assert 'backbone.stem.1.mean_weight' in state and 'decode_head.convs.0.sn.var_weight' in state
    test_dir = str(tmp_path / 'test')
    log = run(['bash', 'tools/dist_test.sh', 'configs/demo/fcn_r18-sn_shapes.py', checkpoint, '2',
               '--work-dir', test_dir, '--cfg-options'] + data +
              ['model.backbone.norm_cfg.type=SyncSN', 'model.decode_head.norm_cfg.type=SyncSN'],
              tmp_path / 'test.log', 120, port_offset=1)
    assert 'mIoU' in log
    scalars = glob.glob(osp.join(test_dir, '*', '*.json'))
    assert any('mIoU' in json.loads(open(p).readlines()[-1]) for p in scalars)


def wait_for(path, job, timeout=120):
    """Waits until ``path`` exists (the job still running)."""
    deadline = time.monotonic() + timeout
    while not osp.exists(path):
        assert job.process.poll() is None, f'job ended early:\n{job.output()[-4000:]}'
        assert time.monotonic() < deadline, f'no {path} after {timeout} s'
        time.sleep(0.05)


#: the collective timeout of the hang test, and torchrun's grace between SIGTERM and SIGKILL
#: (a stopped process ignores SIGTERM until it is continued)
HANG_TIMEOUT, TORCHRUN_GRACE = 8, 30


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stopped_rank_ends_the_job_within_its_timeout_naming_the_rank(shapes_root, tmp_path):
    """A rank that stops responding (SIGSTOP) mid-training: the others' collective fails
    after ``env_cfg.dist_cfg.timeout``, they wait as long again for the stopped rank to
    answer through the job's store and name it, and torchrun ends the job: within
    2 x timeout + torchrun's 30 s grace (+ a margin for the machine's load)."""
    work_dir = tmp_path / 'work'
    options = sync_sn_options(shapes_root, 'train_cfg.max_iters=1000', 'train_cfg.val_interval=1000',
                              'default_hooks.checkpoint.interval=2',
                              f'env_cfg.dist_cfg.timeout={HANG_TIMEOUT}')
    job = Job(['bash', 'tools/dist_train.sh', 'configs/demo/fcn_r18-sn_shapes.py', '2',
               '--work-dir', str(work_dir), '--cfg-options', *options],
              str(tmp_path / 'train.log'), cwd=ROOT, env=job_env(port_offset=2))
    try:
        wait_for(work_dir / 'last_checkpoint', job)  # (training is under way)
        os.kill(job.rank_pid(1), signal.SIGSTOP)
        stopped = time.monotonic()
        code = job.wait(timeout=200)
    finally:
        job.kill()
    ended = time.monotonic() - stopped
    log = job.output()
    assert code != 0, log[-3000:]
    assert ended < 2 * HANG_TIMEOUT + TORCHRUN_GRACE + 20, (ended, log[-3000:])
    assert 'rank(s) 1 did not respond within 8 s' in log, log[-3000:]


def test_demo_checks_its_figures():
    """tools/demo.py accepts the figures seen on every machine so far and refuses those of an
    untrained model (after 4 iterations: APs 0, mIoU 21.7, the background alone)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('demo_tool', osp.join(ROOT, 'tools/demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for box, mask, miou in ((0.469, 0.497, 80.46), (0.465, 0.515, 79.10)):
        assert demo.check_figures({'detection': {'box AP': box, 'mask AP': mask, 'minutes': 7},
                                   'segmentation': {'mIoU': miou, 'minutes': 2}}) == []
    wrong = demo.check_figures({'detection': {'box AP': 0.0, 'mask AP': 0.001},
                                'segmentation': {'mIoU': 21.7}})
    assert len(wrong) == 3 and 'mIoU = 21.700: expected 72.0 to 90.0' in wrong[2]
