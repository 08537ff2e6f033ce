# sw_small + Mask R-CNN 1x (FPN), COCO. Paper: not reported (the papers report Cascade Mask R-CNN 3x).
# Settings from no official config released; sw_tiny's settings, drop path as UniRepLKNet-S; schedule: the 1x base.
_base_ = ['../_base_/mask_rcnn_lkvision_fpn_1x_coco.py']
dims = [96, 192, 384, 768]
model = dict(
    backbone=dict(model_name='sw_small', drop_path_rate=0.5, model_kwargs=dict(layer_scale_init_value=1.0), sync_bn=True),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12),
)
