# slak_t + Cascade Mask R-CNN 3x (FPN), COCO. Paper: AP_box 51.3 / AP_mask 44.3, SLaK README (300 ep / 36 ep).
# Settings from VITA-Group/SLaK {segmentation,detection}/configs (slak_tiny).
_base_ = ['../_base_/cascade_mask_rcnn_lkvision_fpn_3x_coco.py']
dims = [124, 249, 499, 998]
model = dict(
    backbone=dict(model_name='slak_t', drop_path_rate=0.4, model_kwargs=dict(layer_scale_init_value=1.0)),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0002),
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6),
)
