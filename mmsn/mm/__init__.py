"""OpenMMLab glue: registration of the layers and the ecosystem's BN-only special cases.

Importing ``mmsn`` (e.g. through ``custom_imports=dict(imports=['mmsn'])``) runs
:func:`setup_openmmlab` when mmengine is installed. It

* registers the layers in mmengine's root ``MODELS`` registry, which mmcv's
  ``build_norm_layer`` and every mmdet/mmseg scope reach: 'SN' (= 'SN2d'), 'SN1d', 'SN3d',
  'SyncSN', 'SW', 'SyncSW';
* makes ``norm_eval=True`` of mmdet/mmseg backbones freeze SN/SW layers as it freezes BN
  (their ``train()`` only looks for ``_BatchNorm``);
* makes ``paramwise_cfg=dict(norm_decay_mult=...)`` of mmengine's default optimizer
  constructor apply to SN/SW parameters (affine and ratio logits), as it does to BN;
* lets mmengine load checkpoints under torch >= 2.6 (``weights_only`` loading);
* registers ``SWResNet`` in mmdet and mmseg (SW on chosen layers of their ResNet) and the
  ``StrictPretrained`` initializer (converted backbones, loaded strictly);
* registers the hooks ``SwitchableRatioHook`` (ratios to the visualizer and the checkpoint)
  and ``BatchAverageHook`` (batch-average inference statistics).

The runner's ``sync_bn`` conversion and mmcv's ``fuse_conv_bn`` only touch ``_BatchNorm``;
SN/SW layers are deliberately not ``_BatchNorm`` subclasses, so both leave them intact. Use
:func:`mmsn.convert_sync_sn` to synchronize SN/SW.
"""
from .backbones import SW_PLACEMENTS, register_backbones, replace_norm_layers
from .hooks import BatchAverageHook, SwitchableRatioHook, register_hooks
from .compat import allow_mmengine_checkpoints, patch_norm_decay, patch_norm_eval
from .pretrained import StrictPretrainedInit, register_initializers
from .registry import register_layers


def setup_openmmlab() -> None:
    """Registers the layers and applies the compatibility fixes (idempotent)."""
    register_layers()
    register_initializers()
    register_hooks()
    register_backbones()
    patch_norm_decay()
    patch_norm_eval()
    allow_mmengine_checkpoints()


__all__ = ['setup_openmmlab', 'register_layers', 'patch_norm_eval', 'patch_norm_decay',
           'allow_mmengine_checkpoints', 'register_backbones', 'register_initializers',
           'replace_norm_layers', 'SW_PLACEMENTS', 'StrictPretrainedInit', 'SwitchableRatioHook',
           'BatchAverageHook', 'register_hooks']
