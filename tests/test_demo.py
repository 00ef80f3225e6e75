"""The demo: its configs build and step, and the distributed tools train and test on the CPU."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmsn.checkpoint import load_checkpoint_file

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


def run(command, **extra_env):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', **extra_env)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def test_dist_train_two_cpu_processes_with_sync_sn_then_test(shapes_root, tmp_path):
    work_dir = str(tmp_path / 'work')
    data = [f'{loader}.dataset.data_root={shapes_root}/'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    options = data + [
        'model.backbone.norm_cfg.type=SyncSN', 'model.decode_head.norm_cfg.type=SyncSN',
        'train_dataloader.batch_size=2', 'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
        'default_hooks.checkpoint.interval=4', 'default_hooks.logger.interval=1']
    log = run(['bash', 'tools/dist_train.sh', 'configs/demo/fcn_r18-sn_shapes.py', '2',
               '--work-dir', work_dir, '--cfg-options'] + options,
              PYTHON=sys.executable, PORT=str(29000 + os.getpid() % 1000))
    assert 'Iter(train) [4/4]' in log and "type='SyncSN'" in log
    checkpoint = osp.join(work_dir, 'iter_4.pth')
    assert osp.exists(checkpoint)
    state = load_checkpoint_file(checkpoint, map_location='cpu')['state_dict']
    assert 'backbone.stem.1.mean_weight' in state and 'decode_head.convs.0.sn.var_weight' in state
    test_dir = str(tmp_path / 'test')
    log = run([sys.executable, 'tools/test.py', 'configs/demo/fcn_r18-sn_shapes.py', checkpoint,
               '--work-dir', test_dir, '--cfg-options'] + data + ['model.backbone.norm_cfg.type=SyncSN',
                                                                  'model.decode_head.norm_cfg.type=SyncSN'])
    assert 'mIoU' in log
    scalars = glob.glob(osp.join(test_dir, '*', '*.json'))
    assert any('mIoU' in json.loads(open(p).readlines()[-1]) for p in scalars)
