# unireplknet_s + UperNet, ADE20K 512x512, 160k iterations. Paper: mIoU 50.5 (ss) / 51.0 (ms), UniRepLKNet paper (as cited in SW Table 5).
# Settings from AILab-CVC/UniRepLKNet {segmentation,detection}/configs (unireplknet_s, in1k).
_base_ = ['../_base_/upernet_lkvision_512x512_160k_ade20k.py']
dims = [96, 192, 384, 768]
model = dict(
    backbone=dict(model_name='unireplknet_s', drop_path_rate=0.3),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='layer_wise', num_layers=12),
)
