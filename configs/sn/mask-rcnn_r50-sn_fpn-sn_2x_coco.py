# Mask R-CNN R50-FPN 2x with SN in the backbone, FPN, box head and mask head (SN paper,
# Table 6: box AP 41.0, mask AP 36.5). Everything else is mmdet's recipe. The box head is the
# norm-carrying Shared4Conv1FCBBoxHead, as in mmdet's gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
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
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
# as the SN paper: no weight decay on SN's affine parameters and ratio logits
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
