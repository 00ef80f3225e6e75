# DeepLabV3 R50-D8, ADE20K 80k 512x512, with SyncSN (BN statistics over all GPUs) in the
# backbone and heads. Same as the SN config otherwise.
_base_ = './deeplabv3_r50-sn-d8_4xb4-80k_ade20k-512x512.py'

norm_cfg = dict(type='SyncSN')
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
