# sw_tiny + Cascade Mask R-CNN 3x (FPN), COCO. Paper: AP_box 52.21 / AP_mask 45.19, SW Table 4.
# Settings from lidc54/shift-wiseConv downstream/*/configs (sw_tiny).
_base_ = ['../_base_/cascade_mask_rcnn_lkvision_fpn_3x_coco.py']
dims = [80, 160, 320, 640]
model = dict(
    backbone=dict(model_name='sw_tiny', drop_path_rate=0.4, model_kwargs=dict(layer_scale_init_value=1.0), sync_bn=True),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12),
)
