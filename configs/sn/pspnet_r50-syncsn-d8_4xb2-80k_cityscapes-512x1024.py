# PSPNet R50-D8, Cityscapes 80k 512x1024, with SyncSN (BN statistics over all GPUs) in the
# backbone and heads. Same as the SN config otherwise.
_base_ = './pspnet_r50-sn-d8_4xb2-80k_cityscapes-512x1024.py'

norm_cfg = dict(type='SyncSN')
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
