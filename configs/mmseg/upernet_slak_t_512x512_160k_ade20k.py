# slak_t + UperNet, ADE20K 512x512, 160k iterations. Paper: mIoU 47.6 (ss), SLaK README / SW Table 5.
# Settings from VITA-Group/SLaK {segmentation,detection}/configs (slak_tiny).
_base_ = ['../_base_/upernet_lkvision_512x512_160k_ade20k.py']
dims = [124, 249, 499, 998]
model = dict(
    backbone=dict(model_name='slak_t', drop_path_rate=0.4, model_kwargs=dict(layer_scale_init_value=1.0)),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6),
)
