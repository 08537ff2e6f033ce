# convnext_lk_t + Cascade Mask R-CNN 3x (FPN), COCO. Paper: not reported.
# Settings from RepLKNet Table 11 (ConvNeXt-T, 31-29-27-13); ConvNeXt-T's downstream settings.
_base_ = ['../_base_/cascade_mask_rcnn_lkvision_fpn_3x_coco.py']
dims = [96, 192, 384, 768]
model = dict(
    backbone=dict(model_name='convnext_lk_t', drop_path_rate=0.4, model_kwargs=dict(layer_scale_init_value=1.0)),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0002),
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6),
)
