# unireplknet_t + UperNet, ADE20K 512x512, 160k iterations. Paper: mIoU 48.6 (ss) / 49.1 (ms), UniRepLKNet paper (as cited in SW Table 5).
# Settings from AILab-CVC/UniRepLKNet {segmentation,detection}/configs (unireplknet_t, in1k).
_base_ = ['../_base_/upernet_lkvision_512x512_160k_ade20k.py']
dims = [80, 160, 320, 640]
model = dict(
    backbone=dict(model_name='unireplknet_t', drop_path_rate=0.2),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]),
)
optim_wrapper = dict(
    constructor='LKLayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(decay_rate=1.0, decay_type='layer_wise', num_layers=9),
)
