# UperNet on ADE20K, 512x512 crops, 160k iterations, total batch 16 (8 GPUs x 2), mmseg 1.x syntax.
# The common part of the papers' settings (UniRepLKNet / SW / SLaK / RepLKNet downstream configs): AdamW with
# weight decay 0.05, linear warm-up for 1500 iterations, then poly (power 1) decay to 0; SyncBN in the heads.
# Per-model files set the backbone, the channels and the learning-rate / layer-decay choices.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['lkvision.integrations.mmseg'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='LKVisionBackbone',
        model_name='unireplknet_t',  # overridden per model
        out_indices=(0, 1, 2, 3),
        init_cfg=None,  # dict(type='Pretrained', checkpoint=PATH): official .pth or lkvision .safetensors
    ),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150),
    test_cfg=dict(mode='whole'),
)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
