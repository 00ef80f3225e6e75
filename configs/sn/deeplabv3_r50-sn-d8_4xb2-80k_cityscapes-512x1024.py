# DeepLabV3 R50-D8, Cityscapes 80k 512x1024, with SN in the backbone and in every norm of the
# ASPP head and the auxiliary FCN head. Everything else is mmseg's recipe. The backbone is
# mmseg's ResNet with the 7x7 stem (the SN ImageNet models have it), not ResNetV1c.
_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

norm_cfg = dict(type='SN')
model = dict(
    pretrained=None,
    backbone=dict(
        type='ResNet',
        norm_cfg=norm_cfg,
        init_cfg=dict(type='StrictPretrained',
                      checkpoint='checkpoints/resnet-50-sn-8x2_in1k_mmsn.pth',
                      source='resnet-50-sn-8-2-75.13.pth, segmentation release')),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
# as the SN paper: no weight decay on SN's affine parameters and ratio logits
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
