# replknet_31b + Cascade Mask R-CNN 3x (FPN), COCO. Paper: AP_box 52.2 / AP_mask 45.2, RepLKNet Table 9.
# Settings from DingXiaoH/RepLKNet-pytorch {seg,det}/configs/RepLKNet-31B_1Kpretrain_*.
_base_ = ['../_base_/cascade_mask_rcnn_lkvision_fpn_3x_coco.py']
dims = [128, 256, 512, 1024]
model = dict(
    backbone=dict(model_name='replknet_31b', drop_path_rate=0.6, sync_bn=True, with_cp=True),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(optimizer=dict(lr=0.0004), paramwise_cfg=dict(norm_decay_mult=0.0))
