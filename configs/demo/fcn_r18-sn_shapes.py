# Demo: a small FCN segmentor with SN in the backbone and head, trained on the generated
# shapes dataset (mmsn/demo/shapes.py): the BN demo model (fcn_r18_shapes.py) with SN.
_base_ = ['./fcn_r18_shapes.py']

norm_cfg = dict(type='SN')
model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg))
# the learned ratios, logged for the plots of tools/analysis_tools/plot_ratios.py
# RandomStateHook: resuming continues exactly (the model's random draws are restored)
custom_hooks = [dict(type='SwitchableRatioHook', interval=25), dict(type='RandomStateHook')]
