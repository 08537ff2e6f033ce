# replknet_31b + Mask R-CNN 1x (FPN), COCO. Paper: not reported (the papers report Cascade Mask R-CNN 3x).
# Settings from DingXiaoH/RepLKNet-pytorch {seg,det}/configs/RepLKNet-31B_1Kpretrain_*; schedule: the 1x base.
_base_ = ['../_base_/mask_rcnn_lkvision_fpn_1x_coco.py']
dims = [128, 256, 512, 1024]
model = dict(
    backbone=dict(model_name='replknet_31b', drop_path_rate=0.6, sync_bn=True, with_cp=True),
    neck=dict(in_channels=dims),
)
optim_wrapper = dict(optimizer=dict(lr=0.0004), paramwise_cfg=dict(norm_decay_mult=0.0))
