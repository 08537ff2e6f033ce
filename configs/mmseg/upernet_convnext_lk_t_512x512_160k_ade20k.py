# convnext_lk_t + UperNet, ADE20K 512x512, 160k iterations. Paper: mIoU 46.2 (ss) after 80k iterations and 120-epoch pretraining, RepLKNet Table 11.
# Settings from RepLKNet Table 11 (ConvNeXt-T, 31-29-27-13); ConvNeXt-T's downstream settings.
_base_ = ['../_base_/upernet_lkvision_512x512_160k_ade20k.py']
dims = [96, 192, 384, 768]
model = dict(
    backbone=dict(model_name='convnext_lk_t', drop_path_rate=0.4, model_kwargs=dict(layer_scale_init_value=1.0)),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6),
)
