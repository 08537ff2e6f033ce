# replknet_31b + UperNet, ADE20K 512x512, 160k iterations. Paper: mIoU 49.9 (ss) / 50.6 (ms), RepLKNet Table 8.
# Settings from DingXiaoH/RepLKNet-pytorch {seg,det}/configs/RepLKNet-31B_1Kpretrain_*.
_base_ = ['../_base_/upernet_lkvision_512x512_160k_ade20k.py']
dims = [128, 256, 512, 1024]
model = dict(
    backbone=dict(model_name='replknet_31b', drop_path_rate=0.5, sync_bn=True, with_cp=True),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]),
)
optim_wrapper = dict(optimizer=dict(lr=0.0002), paramwise_cfg=dict(norm_decay_mult=0.0))
# RepLKNet-31B trained 40k iterations at batch 128 (64 GPUs x 2) with a 400-iteration warm-up: the same
# number of samples as 160k iterations at batch 32 (8 GPUs x 4) with a 1600-iteration warm-up.
train_dataloader = dict(batch_size=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1600),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1600, end=160000),
]
