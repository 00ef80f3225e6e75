# Mask R-CNN R50-FPN 2x with SW^a ({BW, IW}, synchronized) at the SW release's 7 backbone
# layers and SyncBN in every other norm of the backbone, FPN, box head and mask head (SW
# paper, appendix C, Table 7: box AP 41.2, mask AP 37.0).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(
        type='SWResNet',
        sw_cfg=dict(type='SyncSW', sw_type=2, num_pergroup=16, T=5),
        sw_layers='imagenet',  # stem + 3x3-conv norm of odd blocks in stages 1-3
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='StrictPretrained',
                      checkpoint='checkpoints/resnet50-swa_in1k_mmsn.pth',
                      source='ResNet-50 SW^a, ImageNet, Switchable-Whitening release')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
