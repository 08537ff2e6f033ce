# sw_tiny + UperNet, ADE20K 512x512, 160k iterations. Paper: mIoU 49.22 (ss) / 50.06 (ms), SW Table 5.
# Settings from lidc54/shift-wiseConv downstream/*/configs (sw_tiny).
_base_ = ['../_base_/upernet_lkvision_512x512_160k_ade20k.py']
dims = [80, 160, 320, 640]
model = dict(
    backbone=dict(model_name='sw_tiny', drop_path_rate=0.4, model_kwargs=dict(layer_scale_init_value=1.0), sync_bn=True),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=1.0, decay_type='layer_wise', num_layers=9),
)
