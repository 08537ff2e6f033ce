# unireplknet_s + Cascade Mask R-CNN 3x (FPN), COCO. Paper: AP_box 53.0 / AP_mask 45.9, UniRepLKNet paper (as cited in SW Table 4).
# Settings from AILab-CVC/UniRepLKNet {segmentation,detection}/configs (unireplknet_s, in1k).
_base_ = ['../_base_/cascade_mask_rcnn_lkvision_fpn_3x_coco.py']
dims = [96, 192, 384, 768]
model = dict(
    backbone=dict(model_name='unireplknet_s', drop_path_rate=0.5, with_cp=True),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12),
)
