"""The norm switch on upstream configs shipped inside the installed mmdet and mmseg
(``mmsn.mm.norm_switch``, ``tools/train.py --norm``), ``--batch-size``, and the study tool."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from mmengine.config import Config  # noqa: E402

from mmsn.mm.batch_size import scale_batch_size  # noqa: E402
from mmsn.mm.norm_check import check_switched, module_changes, norm_modules  # noqa: E402
from mmsn.mm.norm_switch import NormSwitchError, switch_config_norm  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: (scope, path under the package's .mim/configs): 32 configs, 30 families. Three build
#: some BatchNorm layers without the config's norm_cfg: the switch must refuse them.
REFUSED = {'centernet_r18_8xb16-crop512-140e_coco.py', 'bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py',
           'stdc1_4xb12-80k_cityscapes-512x1024.py'}
UPSTREAM = [
    ('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'),
    ('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'),
    ('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py'),
    ('mmdet', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'),
    ('mmdet', 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'),
    ('mmdet', 'atss/atss_r50_fpn_1x_coco.py'),
    ('mmdet', 'gfl/gfl_r50_fpn_1x_coco.py'),
    ('mmdet', 'yolo/yolov3_d53_8xb8-320-273e_coco.py'),
    ('mmdet', 'centernet/centernet_r18_8xb16-crop512-140e_coco.py'),
    ('mmdet', 'yolox/yolox_s_8xb8-300e_coco.py'),
    ('mmdet', 'regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py'),
    ('mmdet', 'hrnet/faster-rcnn_hrnetv2p-w18-1x_coco.py'),
    ('mmdet', 'tood/tood_r50_fpn_1x_coco.py'),
    ('mmdet', 'paa/paa_r50_fpn_1x_coco.py'),
    ('mmseg', 'fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024.py'),
    ('mmseg', 'bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py'),
    ('mmseg', 'stdc/stdc1_4xb12-80k_cityscapes-512x1024.py'),
    ('mmseg', 'fastscnn/fast_scnn_8xb4-160k_cityscapes-512x1024.py'),
    ('mmseg', 'mobilenet_v2/mobilenet-v2-d8_deeplabv3_4xb2-80k_cityscapes-512x1024.py'),
    ('mmseg', 'unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py'),
    ('mmseg', 'ocrnet/ocrnet_hr18_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'danet/danet_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'resnest/resnest_s101-d8_fcn_4xb2-80k_cityscapes-512x1024.py'),
    ('mmseg', 'dpt/dpt_vit-b16_8xb2-160k_ade20k-512x512.py'),
    ('mmseg', 'swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'),
    ('mmseg', 'apcnet/apcnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    ('mmseg', 'ann/ann_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
]


def upstream(scope, path):
    import importlib
    package = osp.dirname(importlib.import_module(scope).__file__)
    cfg = Config.fromfile(osp.join(package, '.mim', 'configs', path))
    cfg.work_dir = '/nonexistent'
    return cfg


def build(cfg):
    from mmengine.registry import MODELS
    with MODELS.switch_scope_and_registry(cfg.default_scope) as registry:
        return registry.build(cfg.model)


def kinds(model):
    counts = {}
    for kind in norm_modules(model).values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def batch_norms(counts):
    return sum(n for kind, n in counts.items() if 'BatchNorm' in kind)


@pytest.mark.slow
@pytest.mark.parametrize('scope,path', UPSTREAM, ids=[p.split('/')[1][:-3] for _, p in UPSTREAM])
def test_sn_switch_rewrites_every_batch_norm(scope, path):
    cfg = upstream(scope, path)
    before = build(cfg)
    report = switch_config_norm(cfg, 'SN', pretrained='none')
    after = build(cfg)
    old, new = kinds(before), kinds(after)
    if osp.basename(path) in REFUSED:
        assert 0 < batch_norms(new) < batch_norms(old)
        with pytest.raises(NormSwitchError, match='built without the config'):
            check_switched(after, 'SN')
        return
    assert batch_norms(old) > 0 and batch_norms(new) == 0, (old, new)
    # one SN per BatchNorm; LayerNorm and GroupNorm left alone (and reported)
    assert new.get('SwitchNorm2d', 0) + new.get('SwitchNorm1d', 0) == batch_norms(old)
    for kind in ('LayerNorm', 'GroupNorm'):
        assert new.get(kind, 0) == old.get(kind, 0)
    for kind, name in (('LayerNorm', 'LN'), ('GroupNorm', 'GN')):
        if old.get(kind) and path.split('/')[0] not in ('swin', 'dpt', 'segformer'):
            # (transformer backbones build their LayerNorms from norm_cfg=LN, reported)
            assert any(f'({name}) is not a BatchNorm' in note for note in report.notes)
    check_switched(after, 'SN')
    lines = module_changes(before, after)
    assert len(lines) == batch_norms(old) and all('-> SwitchNorm' in line for line in lines)
    # what SN needs for training: trainable norms, norm_eval off, no decay on norm parameters
    switched = [node['norm_cfg'] for node in _dicts(cfg.model)
                if isinstance(node.get('norm_cfg'), dict) and node['norm_cfg'].get('type') in
                ('SN', 'SN1d', 'SN3d')]
    assert switched and all(n['requires_grad'] for n in switched)
    assert not any(node.get('norm_eval') for node in _dicts(cfg.model))
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.0
    backbone = cfg.model.backbone
    assert backbone.get('init_cfg') is None and cfg.model.get('pretrained') is None


def _dicts(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _dicts(value)


def test_gn_picks_32_groups_or_the_largest_divisor_and_says_so():
    cfg = upstream('mmseg', 'fastscnn/fast_scnn_8xb4-160k_cityscapes-512x1024.py')
    before = build(cfg)
    switch_config_norm(cfg, 'GN', pretrained='none')
    after = build(cfg)
    groups = [m for m in after.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert groups and batch_norms(kinds(after)) == 0
    assert all(m.num_groups == 32 for m in groups if m.num_channels % 32 == 0)
    odd = [m for m in groups if m.num_channels % 32]
    assert odd and all(m.num_channels % m.num_groups == 0 and m.num_groups < 32 for m in odd)
    lines = module_changes(before, after)
    assert sum('groups for' in line for line in lines) == len(odd)


def test_heads_get_norms_only_when_asked():
    cfg = upstream('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    report = switch_config_norm(cfg, 'SyncSN', pretrained='none')
    assert cfg.model.roi_head.bbox_head.type == 'Shared2FCBBoxHead'
    assert any('--norm-heads' in note for note in report.notes)
    cfg = upstream('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    switch_config_norm(cfg, 'SyncSN', heads=True, pretrained='none')
    assert cfg.model.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
    for node in (cfg.model.neck, cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head):
        assert node.norm_cfg.type == 'SyncSN'
    counts = kinds(build(cfg))
    assert batch_norms(counts) == 0 and counts['SyncSwitchNorm'] > 53


def test_sw_goes_into_resnet_backbones_at_a_placement():
    cfg = upstream('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    switch_config_norm(cfg, 'SW', pretrained='none')
    counts = kinds(build(cfg))
    assert counts['SwitchWhiten2d'] == 7 and counts['BatchNorm2d'] == 53 - 7
    with pytest.raises(NormSwitchError, match='ResNet backbone'):
        switch_config_norm(upstream('mmseg', 'fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
                           'SW', pretrained='none')  # deep stem


def test_models_that_cannot_be_switched_are_refused():
    with pytest.raises(NormSwitchError, match='SSDVGG.* takes no norm_cfg'):
        switch_config_norm(upstream('mmdet', 'ssd/ssd300_coco.py'), 'SN', pretrained='none')
    cfg = upstream('mmseg', 'segmenter/segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py')
    with pytest.raises(NormSwitchError, match='nothing to switch'):  # LayerNorm only
        switch_config_norm(cfg, 'SN', pretrained='none')
    cfg = upstream('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py')
    cfg.model.backbone = dict(type='ResNeXt', depth=50)  # its class default: BN
    report = switch_config_norm(cfg, 'SN', pretrained='none')
    assert ('model.backbone.norm_cfg', 'BN (its default)', 'SN') in report.changes
    # a refused switch leaves the config as it was
    cfg = upstream('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py')
    before = cfg.to_dict()
    with pytest.raises(NormSwitchError, match='GN has no conversion'):
        switch_config_norm(cfg, 'GN')  # (the ImageNet BN weights cannot become GN)
    assert cfg.to_dict() == before
    cfg = upstream('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py')
    cfg.model.backbone = dict(type='mmpretrain.TIMMBackbone', model_name='resnet18')
    with pytest.raises(NormSwitchError, match='unknown'):  # mmpretrain is not installed
        switch_config_norm(cfg, 'SN', pretrained='none')
    # a module that builds BatchNorm without the config: caught on the built model
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    with pytest.raises(NormSwitchError, match='1 BatchNorm'):
        check_switched(model, 'SN')
    with pytest.raises(ValueError, match='norm'):
        switch_config_norm(upstream('mmdet', 'ssd/ssd300_coco.py'), 'LN')


@pytest.mark.slow
def test_pretrained_weights_converted_or_a_clear_stop(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cfg = upstream('mmdet', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py')
    with pytest.raises(NormSwitchError, match='resnet50_caffe.*expected on this machine at '
                       f'{tmp_path}.*--no-pretrained'):
        switch_config_norm(cfg, 'SN', work_dir=str(tmp_path))
    # a BN ResNet-18 ImageNet model (random weights, torchvision's names, a classifier)
    bn = upstream('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py')
    state = build(bn).backbone.state_dict()
    state['fc.weight'], state['fc.bias'] = torch.zeros(1000, 512), torch.zeros(1000)
    source = str(tmp_path / 'resnet18_bn.pth')
    torch.save(state, source)
    cfg = upstream('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg.checkpoint = source
    report = switch_config_norm(cfg, 'SN', work_dir=str(tmp_path))
    init_cfg = cfg.model.backbone.init_cfg
    assert init_cfg.type == 'StrictPretrained' and osp.isfile(init_cfg.checkpoint)
    assert any('BN path' in note for note in report.notes)
    model = build(cfg)
    model.backbone.init_weights()  # strict: every tensor filled
    torch.testing.assert_close(model.backbone.conv1.weight, state['conv1.weight'])
    torch.testing.assert_close(model.backbone.sn1.running_var, state['bn1.running_var'])
    gn = upstream('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py')
    gn.model.backbone.init_cfg.checkpoint = source
    with pytest.raises(NormSwitchError, match='GN has no conversion'):
        switch_config_norm(gn, 'GN')
    with pytest.raises(NormSwitchError, match='ResNetV1c.*7x7 stem only.*--no-pretrained'):
        switch_config_norm(upstream('mmseg', 'fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
                           'SN')


def test_new_norms_keep_dimension_eps_and_momentum():
    from mmsn.mm.norm_switch import target_norm_cfg
    old = dict(type='BN1d', eps=1e-3, momentum=0.03, requires_grad=False)
    assert target_norm_cfg('SN', old) == dict(type='SN1d', eps=1e-3, momentum=0.03,
                                              requires_grad=True)
    assert target_norm_cfg('BN', old) == dict(type='BN1d', eps=1e-3, momentum=0.03,
                                              requires_grad=True)
    assert target_norm_cfg('GN', old)['eps'] == 1e-3
    with pytest.raises(NormSwitchError, match='no SyncSN counterpart'):
        target_norm_cfg('SyncSN', old)


def test_from_scratch_unfreezes_what_only_pretrained_weights_justified():
    cfg = upstream('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    switch_config_norm(cfg, 'BN', pretrained='none')
    backbone = cfg.model.backbone
    assert backbone.frozen_stages == -1 and backbone.norm_eval is False
    assert backbone.init_cfg is None


def test_world_size_and_first_process_under_each_launcher(monkeypatch):
    import argparse
    from mmsn.mm.launch import _is_first_process, _world_size
    for name in ('WORLD_SIZE', 'RANK', 'SLURM_NTASKS', 'SLURM_PROCID'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_PROCID', '3')
    assert _world_size(argparse.Namespace(launcher='slurm')) == 8
    assert _world_size(argparse.Namespace(launcher='none')) == 1
    assert not _is_first_process()


def test_batch_size_scales_the_learning_rate_from_the_configs_total():
    cfg = upstream('mmseg', 'fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py')
    lr = cfg.optim_wrapper.optimizer.lr
    line = scale_batch_size(cfg, 1, 2, 'fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py')
    assert cfg.train_dataloader.batch_size == 1 and '4 processes' in line
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(lr * 2 / 8)
    cfg = upstream('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')  # auto_scale_lr 16
    lr = cfg.optim_wrapper.optimizer.lr
    scale_batch_size(cfg, 4, 2, 'faster-rcnn_r50_fpn_1x_coco.py')
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(lr * 8 / 16)
    assert cfg.auto_scale_lr.enable is False
    with pytest.raises(ValueError, match='total batch size is unknown'):
        scale_batch_size(Config(dict(train_dataloader=dict(batch_size=2))), 1, 1, 'x.py')


@pytest.mark.slow
@pytest.mark.parametrize('scope,path,norm', [
    ('mmseg', 'fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py', 'SN'),
    ('mmseg', 'fastscnn/fast_scnn_8xb4-160k_cityscapes-512x1024.py', 'GN'),
    ('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py', 'SN'),
], ids=['fcn-r50-SN', 'fastscnn-GN', 'retinanet-r18-SN'])
def test_switched_models_take_a_training_step(scope, path, norm):
    from mmengine.optim import build_optim_wrapper
    from test_configs import training_loss
    cfg = upstream(scope, path)
    switch_config_norm(cfg, norm, pretrained='none')
    if scope == 'mmseg':
        cfg.model.data_preprocessor.size = (64, 64)
    model = build(cfg)
    check_switched(model, norm)
    num_classes = (cfg.model.bbox_head.num_classes if scope == 'mmdet'
                   else cfg.model.decode_head.num_classes)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    optim_wrapper.update_params(training_loss(model, scope, num_classes)[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_train_tool_prints_every_changed_module_and_the_study_tool_runs(tmp_path):
    """The study tool on two tiny runs (BN and SN, one process), through tools/train.py
    --norm/--batch-size; run again, it keeps both runs (resume)."""
    from mmsn.demo.shapes import make_shapes_dataset
    data = str(tmp_path / 'shapes')
    make_shapes_dataset(data, num_train=4, num_val=2)
    roots = [f'{split}_dataloader.dataset.data_root={data}/'
             for split in ('train', 'val', 'test')]
    command = [sys.executable, osp.join(ROOT, 'tools/analysis_tools/norm_study.py'),
               osp.join(ROOT, 'configs/demo/fcn_r18_shapes.py'), '--norms', 'BN', 'SN',
               '--batch-sizes', '2', '--images', '4', '--work-dir', str(tmp_path / 'study'),
               '--cfg-options', *roots]
    env = dict(os.environ, MMSN_BACKEND='torch')
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study = tmp_path / 'study'
    result = json.loads((study / 'SN_b2' / 'result.json').read_text())
    assert result['iters'] == 2 and result['images'] == 4 and 'mIoU' in result['metrics']
    log = (study / 'SN_b2' / 'train.log').read_text()
    assert 'model.backbone.norm_cfg: BN -> SN' in log
    assert 'backbone.layer1.0.sn1: BatchNorm2d -> SwitchNorm2d' in log
    assert '25 norm modules changed' in log
    assert '1 x 2 = 2 images per step (config: 8' in log
    for name in ('study.md', 'study.csv', 'study.png'):
        assert (study / name).stat().st_size > 0
    rows = (study / 'study.csv').read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith('BN,2,1,2,4,mIoU,')
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count('done before, kept') == 2
