# Faster R-CNN R50-FPN 1x with SN in the backbone, FPN and box head (SN paper, Table 5:
# box AP 39.3). Everything else is mmdet's recipe. The box head is the norm-carrying
# Shared4Conv1FCBBoxHead, as in mmdet's gn/ configs.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

norm_cfg = dict(type='SN')
model = dict(
    backbone=dict(
        norm_cfg=norm_cfg,
        norm_eval=False,  # the authors keep SN in train mode (batch statistics) when finetuning
        init_cfg=dict(type='StrictPretrained',
                      checkpoint='checkpoints/resnet-sn-50-8x2_in1k_mmsn.pth',
                      source='resnet-sn-50-(8,2)-fpn.pth, detection release')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                                 norm_cfg=norm_cfg)))
# as the SN paper: no weight decay on SN's affine parameters and ratio logits
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
