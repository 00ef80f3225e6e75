"""OpenMMLab glue: registration of the layers and the ecosystem's BN-only special cases.

Importing ``mmsn`` (e.g. through ``custom_imports=dict(imports=['mmsn'])``) runs
:func:`setup_openmmlab` when mmengine is installed. It

* registers the layers in mmengine's root ``MODELS`` registry, which mmcv's
  ``build_norm_layer`` and every mmdet/mmseg scope reach: 'SN' (= 'SN2d'), 'SN1d', 'SN3d',
  'SyncSN', 'SSN', 'SyncSSN', 'SW', 'SyncSW';
* wraps the build function of the ``MODELS`` registries so that a built model's
  ``norm_eval=True`` freezes SN/SW layers as it freezes BN (mmdet/mmseg backbones and any
  other class whose ``train()`` reads ``norm_eval`` only looks for ``_BatchNorm``), and so
  that ``SWResNet`` (SW on chosen layers of mmdet's or mmseg's ResNet) is registered in
  mmdet's or mmseg's registry the first time a config of that scope asks for it;
* makes ``paramwise_cfg=dict(norm_decay_mult=...)`` of mmengine's default optimizer
  constructor apply to SN/SW parameters (affine and ratio logits), as it does to BN;
* makes mmengine load local checkpoints with ``weights_only=True`` and exactly the globals
  its own checkpoints hold (:mod:`mmsn.checkpoint`), so resuming works under torch >= 2.6
  and anything else is refused unless trusted by path;
* registers the ``StrictPretrained`` initializer (converted backbones, loaded strictly);
* registers the hooks ``SwitchableRatioHook`` (ratios to the visualizer and the checkpoint),
  ``BatchAverageHook`` (batch-average inference statistics), ``SSNRadiusHook`` (the SSN
  radius schedule), ``RandomStateHook`` (exact resume) and ``AtomicCheckpointHook``
  (checkpoints a kill cannot spoil; ``tools/train.py`` uses it in place of
  ``CheckpointHook``), and the file backend ``'mmsn_atomic_local'`` it saves through.

The runner's ``sync_bn`` conversion and mmcv's ``fuse_conv_bn`` only touch ``_BatchNorm``;
SN/SW layers are deliberately not ``_BatchNorm`` subclasses, so both leave them intact. Use
:func:`mmsn.convert_sync_sn` to synchronize SN/SW.
"""
from ..layers.placement import SW_PLACEMENTS
from .backbones import register_backbones, replace_norm_layers
from .checkpoint_hook import AtomicCheckpointHook, register_checkpoint_hook
from .hooks import BatchAverageHook, SwitchableRatioHook, register_hooks
from .compat import (install_build_hook, install_checkpoint_loader, patch_norm_decay,
                     patch_norm_eval, register_config_package)
from .pretrained import StrictPretrainedInit, register_initializers
from .registry import register_layers


def setup_openmmlab() -> None:
    """Registers the layers and applies the compatibility fixes (idempotent). Imports
    neither mmdet nor mmseg."""
    register_layers()
    register_initializers()
    register_hooks()
    register_checkpoint_hook()
    install_build_hook()
    patch_norm_decay()
    install_checkpoint_loader()
    register_config_package()


__all__ = ['setup_openmmlab', 'register_layers', 'patch_norm_eval', 'patch_norm_decay',
           'install_checkpoint_loader', 'install_build_hook', 'register_backbones', 'register_initializers',
           'replace_norm_layers', 'SW_PLACEMENTS', 'StrictPretrainedInit', 'SwitchableRatioHook',
           'BatchAverageHook', 'register_hooks', 'AtomicCheckpointHook',
           'register_checkpoint_hook', 'register_config_package']
