# Faster R-CNN R50-FPN 1x with SyncSN (BN statistics over all GPUs) in the backbone, FPN
# and box head. Same as the SN config otherwise.
_base_ = './faster-rcnn_r50-sn_fpn-sn_1x_coco.py'

norm_cfg = dict(type='SyncSN')
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
# the model's random state in every checkpoint: --resume continues exactly (mmsn.mm.hooks)
custom_hooks = [dict(type='RandomStateHook')]
