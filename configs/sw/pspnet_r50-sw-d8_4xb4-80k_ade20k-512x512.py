# PSPNet R50-D8, ADE20K 80k 512x512, with SW^a ({BW, IW}, synchronized) at the stem and the
# 3x3-conv norm of every block outside the 2048-channel stage (SW paper appendix B: 14
# layers) and mmseg's SyncBN everywhere else. The backbone has the 7x7 stem of the SW
# ImageNet models.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py'
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    backbone=dict(
        type='SWResNet',
        sw_cfg=dict(type='SyncSW', sw_type=2, num_pergroup=16, T=5),
        sw_layers='segmentation',
        init_cfg=dict(type='StrictPretrained',
                      checkpoint='checkpoints/resnet50-swa-seg14_in1k_mmsn.pth',
                      source='ResNet-50 SW^a, ImageNet, Switchable-Whitening release',
                      convert_options='--sw-layers segmentation')))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
