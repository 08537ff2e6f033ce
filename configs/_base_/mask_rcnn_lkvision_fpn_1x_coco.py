# Mask R-CNN + FPN on COCO, 1x schedule (12 epochs, LR steps at 8 and 11), total batch 16, mmdet 3.x syntax.
# AdamW (lr 1e-4, weight decay 0.05) with 1000 warm-up iterations: the ConvNeXt/Swin 1x setting that the
# large-kernel papers compare against. Per-model files set the backbone and the FPN input channels.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['lkvision.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='LKVisionBackbone',
        model_name='unireplknet_t',  # overridden per model
        out_indices=(0, 1, 2, 3),
        init_cfg=None,  # dict(type='Pretrained', checkpoint=PATH): official .pth or lkvision .safetensors
    ),
)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
