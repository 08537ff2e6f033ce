# slak_t + Mask R-CNN 1x (FPN), COCO. Paper: not reported (the papers report Cascade Mask R-CNN 3x).
# Settings from VITA-Group/SLaK {segmentation,detection}/configs (slak_tiny); schedule: the 1x base.
_base_ = ['../_base_/mask_rcnn_lkvision_fpn_1x_coco.py']
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
