# sw_small + Cascade Mask R-CNN 3x (FPN), COCO. Paper: AP_box 52.7 / AP_mask 45.67, SW Table 4.
# Settings from no official config released; sw_tiny's settings, drop path as UniRepLKNet-S.
_base_ = ['../_base_/cascade_mask_rcnn_lkvision_fpn_3x_coco.py']
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
