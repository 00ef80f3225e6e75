"""The shipped COCO / ADE20K / Cityscapes configs: they build, step and predict, their norm
layers are what they say, and apart from normalization they are the upstream recipes."""
import os.path as osp

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from mmengine.config import Config  # noqa: E402

from mmsn.layers import SwitchableLayer  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Norm layers of the R50 models: backbone 53 (stem, 48 block norms, 4 shortcuts), FPN 8
# (4 lateral + 4 output convs), Shared4Conv1FC box head 4, FCN mask head 4, ASPP head 6
# (image pool, 4 branches, bottleneck), PPM head 5 (4 pool scales, bottleneck), aux FCN 1.
DET_SN = {'SwitchNorm2d': 53 + 8 + 4}
SEG = {'deeplabv3': 53 + 6 + 1, 'pspnet': 53 + 5 + 1}
CONFIGS = {}
for _norm, _cls in (('sn', 'SwitchNorm2d'), ('syncsn', 'SyncSwitchNorm')):
    CONFIGS[f'sn/faster-rcnn_r50-{_norm}_fpn-{_norm}_1x_coco.py'] = (
        'mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', {_cls: 53 + 8 + 4})
    CONFIGS[f'sn/mask-rcnn_r50-{_norm}_fpn-{_norm}_2x_coco.py'] = (
        'mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py', {_cls: 53 + 8 + 4 + 4})
# SW at 7 backbone layers, SyncBN at the 46 other backbone norms and in FPN and heads.
CONFIGS['sw/mask-rcnn_r50-sw_fpn-syncbn_2x_coco.py'] = (
    'mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py',
    {'SyncSwitchWhiten2d': 7, 'SyncBatchNorm': 46 + 8 + 4 + 4})
for _model, _head in SEG.items():
    for _data in ('4xb4-80k_ade20k-512x512', '4xb2-80k_cityscapes-512x1024'):
        _upstream = f'{_model}/{_model}_r50-d8_{_data}.py'
        CONFIGS[f'sn/{_model}_r50-sn-d8_{_data}.py'] = ('mmseg', _upstream,
                                                        {'SwitchNorm2d': _head})
        CONFIGS[f'sn/{_model}_r50-syncsn-d8_{_data}.py'] = ('mmseg', _upstream,
                                                            {'SyncSwitchNorm': _head})
        # SW at 14 backbone layers, SyncBN at the 39 others and in the heads.
        CONFIGS[f'sw/{_model}_r50-sw-d8_{_data}.py'] = (
            'mmseg', _upstream, {'SyncSwitchWhiten2d': 14, 'SyncBatchNorm': _head - 14})

# What a config may change with respect to its upstream base: normalization and what
# normalization needs (pretrained backbone, norm_eval, no decay on norm parameters, the
# norm-carrying box head of mmdet's gn/ configs) and mmsn's hooks (RandomStateHook: exact
# resume).
NORM_FIELDS = (
    'custom_imports', 'custom_hooks', 'norm_cfg', 'model.pretrained', 'model.backbone.type',
    'model.backbone.norm_cfg', 'model.backbone.norm_eval', 'model.backbone.init_cfg',
    'model.backbone.sw_cfg', 'model.backbone.sw_layers', 'model.neck.norm_cfg',
    'model.roi_head.bbox_head.type', 'model.roi_head.bbox_head.conv_out_channels',
    'model.roi_head.bbox_head.norm_cfg', 'model.roi_head.mask_head.norm_cfg',
    'model.decode_head.norm_cfg', 'model.auxiliary_head.norm_cfg',
    'optim_wrapper.paramwise_cfg')


def test_every_shipped_config_is_tested():
    import glob
    shipped = {osp.relpath(p, osp.join(ROOT, 'configs'))
               for folder in ('sn', 'sw') for p in glob.glob(osp.join(ROOT, 'configs', folder,
                                                                      '*.py'))}
    assert shipped == set(CONFIGS) and len(CONFIGS) == 17


def load(config):
    return Config.fromfile(osp.join(ROOT, 'configs', config))


def load_upstream(scope, path, tmp_path):
    # Config.fromfile('mmdet::...') does not resolve the prefix; a file inheriting it does.
    stub = tmp_path / 'upstream.py'
    stub.write_text(f"_base_ = '{scope}::{path}'\n")
    return Config.fromfile(str(stub))


def differences(ours, theirs, path=''):
    """Dotted paths where two config trees differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for key in sorted(set(ours) | set(theirs), key=str):
            sub = f'{path}.{key}' if path else str(key)
            if key not in ours or key not in theirs:
                found.append(sub)
            else:
                found += differences(ours[key], theirs[key], sub)
        return found
    return [] if ours == theirs else [path]


def count_norms(model):
    counts = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, SwitchableLayer)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_config_changes_only_normalization(config, tmp_path):
    scope, upstream, _ = CONFIGS[config]
    ours, theirs = load(config).to_dict(), load_upstream(scope, upstream, tmp_path).to_dict()
    changed = differences(ours, theirs)
    outside = [p for p in changed if not p.startswith(NORM_FIELDS)]
    assert not outside, f'{config} changes more than normalization: {outside}'
    # the dataloaders, loops, schedules and optimizer are the upstream ones, in particular
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg',
                'val_cfg', 'test_cfg', 'param_scheduler', 'val_evaluator', 'test_evaluator'):
        assert ours[key] == theirs[key], key
    assert ours['optim_wrapper']['optimizer'] == theirs['optim_wrapper']['optimizer']
    init_cfg = ours['model']['backbone']['init_cfg']
    assert init_cfg['type'] == 'StrictPretrained' and init_cfg['checkpoint'].startswith(
        'checkpoints/')


def synthetic_batch(scope, num_classes, size=64):
    torch.manual_seed(0)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch_size=2, image_shapes=[(3, size, size)] * 2,
                              num_items=[3, 2], num_classes=num_classes, with_mask=True)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, size, size)))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(2)]
    return dict(inputs=inputs, data_samples=samples)


def training_loss(model, scope, num_classes):
    """The (finite) loss of one training forward of ``model`` on a synthetic batch, and
    the batch."""
    batch = synthetic_batch(scope, num_classes)
    model.train()
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss)
    return loss, batch


@pytest.mark.slow
@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_config_builds_steps_and_predicts(config):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    scope, _, expected = CONFIGS[config]
    cfg = load(config)
    cfg.model.backbone.init_cfg = None  # pretrained loading off: no converted file here
    if scope == 'mmseg':
        cfg.model.data_preprocessor.size = (64, 64)  # tiny crops instead of 512x512
    init_default_scope(scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert count_norms(model) == expected
    if 'cityscapes' in config:
        # the same model as its ADE20K twin (stepped below) but for the class count, which
        # the build above checks: the step would repeat that one (suite time)
        return
    for module in model.modules():  # undo zero-init residuals: every norm must get gradients
        if isinstance(module, SwitchableLayer) or 'BatchNorm' in type(module).__name__:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    if scope == 'mmdet':
        num_classes = cfg.model.roi_head.bbox_head.num_classes
    else:
        num_classes = cfg.model.decode_head.num_classes
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    loss, batch = training_loss(model, scope, num_classes)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    # The ratio logits of the trainable norm layers get gradients (frozen stages excepted).
    logits = [k for k, p in model.named_parameters()
              if p.requires_grad and k.endswith(('mean_weight', 'var_weight'))]
    without = [k for k in logits if not (k in grads and grads[k].any())]
    assert logits and not without
    optim_wrapper.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        predictions = model.val_step(batch)
    assert len(predictions) == 2
    if scope == 'mmdet':
        assert all(torch.isfinite(p.pred_instances.bboxes).all() for p in predictions)
    else:
        assert all(p.pred_sem_seg.data.shape[-2:] == (64, 64) for p in predictions)


def test_missing_pretrained_backbone_fails_with_instructions():
    from mmengine.registry import MODELS, init_default_scope
    cfg = load('sw/pspnet_r50-sw-d8_4xb4-80k_ade20k-512x512.py')
    checkpoint = cfg.model.backbone.init_cfg.checkpoint
    init_default_scope('mmseg')
    backbone = MODELS.build(cfg.model.backbone)
    with pytest.raises(FileNotFoundError) as error:
        backbone.init_weights()
    message = str(error.value)
    assert checkpoint in message and 'mmsn-sn2mm --sw-layers segmentation SRC' in message


def test_strict_pretrained_loads_and_refuses_incomplete_files(tmp_path):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    cfg = dict(type='ResNet', depth=18, base_channels=8, norm_cfg=dict(type='SN'))
    source = MODELS.build(cfg)
    for p in source.parameters():
        p.data.uniform_(-1, 1)
    state = source.state_dict()
    torch.save(dict(state_dict=state, meta=dict()), tmp_path / 'full.pth')
    target = MODELS.build(dict(cfg, init_cfg=dict(type='StrictPretrained',
                                                  checkpoint=str(tmp_path / 'full.pth'))))
    target.init_weights()
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    del state['layer1.0.sn2.mean_weight']
    torch.save(dict(state_dict=state), tmp_path / 'truncated.pth')
    target = MODELS.build(dict(cfg, init_cfg=dict(type='StrictPretrained',
                                                  checkpoint=str(tmp_path / 'truncated.pth'))))
    with pytest.raises(RuntimeError, match='layer1.0.sn2.mean_weight'):
        target.init_weights()
