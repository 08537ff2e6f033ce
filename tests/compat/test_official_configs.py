"""Every configuration the official constructors accept, and every layout the official repositories release,
loads through ``lkvision.compat.from_official`` (issue 10 §4).

Official-layout state dicts are made here by renaming a randomised lkvision model's tensors to the official names
(the inverse key maps below); what each block computes is then checked against a reference written from the
official tensors with plain ``F.conv2d`` / ``F.batch_norm``, following the semantics in ``shared/spec`` (LK.md,
SW.md), and every official re-parameterisation is reproduced the way the spec describes it.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import lkvision
from conftest import golden_meta, golden_tensors, randomize_bn_and_scales
from lkvision.compat import from_official
from lkvision.compat.shiftwise import official_to_lkvision_kwargs, to_official
from lkvision.compat.slak import official_to_model_kwargs as slak_kwargs
from lkvision.compat.unireplknet import OFFICIAL_VARIANTS as UNIREP_VARIANTS
from lkvision.compat.unireplknet import official_to_model_kwargs as unirep_kwargs
from lkvision.models import CheckpointError
from lkvision.models.shiftwise import ShiftWiseNet
from lkvision.models.slak import SLaK
from lkvision.models.unireplknet import UniRepLKNet

TOL = 1e-5
EPS = 1e-5  # BatchNorm eps of every official BN


def _max_diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max(_max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape
    return float((a - b).abs().max())


def _rename(sd: dict, rules) -> dict:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics, scales and biases (zero-initialised biases would hide a wrong bias fold)."""
    randomize_bn_and_scales(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            b = getattr(m, "bias", None)
            if isinstance(b, torch.nn.Parameter) and not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def _bn(y: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.batch_norm(y, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, EPS)


def _fuse(sd: dict, p: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LK.md §1.3: W' = W * gamma/sigma, b' = beta + (b_conv - mu) * gamma/sigma."""
    t = sd[p + "bn.weight"] / (sd[p + "bn.running_var"] + EPS).sqrt()
    b0 = sd.get(p + "conv.bias", torch.zeros_like(t))
    return sd[p + "conv.weight"] * t[:, None, None, None], sd[p + "bn.bias"] + (b0 - sd[p + "bn.running_mean"]) * t


def _layer_norm_cf(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """The official channels-first LayerNorm (eps 1e-6) of the downstream outputs ``norm{i}``."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[p + "weight"], sd[p + "bias"], 1e-6
                        ).permute(0, 3, 1, 2)


# ================================================================================================ SLaK
_SLAK_TO_OFFICIAL = [
    (r"^stem\.", "downsample_layers.0."),
    (r"^downsamples\.(\d)\.", lambda m: f"downsample_layers.{int(m[1]) + 1}."),
    (r"\.large_kernel\.strip_v\.", ".large_kernel.LoRA1."),
    (r"\.large_kernel\.strip_h\.", ".large_kernel.LoRA2."),
    (r"\.large_kernel\.large\.", ".large_kernel.lkb_origin."),
    (r"\.large_kernel\.small\.", ".large_kernel.small_conv."),
    (r"\.large_kernel\.conv\.", ".large_kernel.lkb_reparam."),
    (r"\.fc1\.", ".pwconv1."),
    (r"\.fc2\.", ".pwconv2."),
    (r"\.layer_scale\.gamma$", ".gamma"),
    (r"^feature_norms\.(\d)\.", r"norm\1."),
]
_SLAK_BASE = dict(depths=[1, 1, 2, 1], dims=[16, 24, 32, 40])
SLAK_CONFIGS = {
    "dense_small3": dict(kernel_size=[13, 11, 9, 7, 3], Decom=False),
    "dense_default_decom_none": dict(kernel_size=[9, 7, 7, 5, 3]),  # the constructor default Decom=None
    "readme_convnext_100": dict(kernel_size=[7, 7, 7, 7, 100]),  # N > every M: no small kernel (even N)
    "dense_small_in_some_stages": dict(kernel_size=[13, 11, 9, 7, 9], Decom=False),
    "dense_no_bn": dict(kernel_size=[13, 11, 9, 7, 3], Decom=False, bn=False),
    "dense_no_layer_scale_width": dict(kernel_size=[11, 9, 7, 5, 3], Decom=False, layer_scale_init_value=0,
                                       width_factor=1.3),
    "strips": dict(kernel_size=[13, 11, 9, 7, 5], Decom=True),
    "strips_no_bn": dict(kernel_size=[13, 11, 9, 7, 3], Decom=True, bn=False),
    "strips_n_equals_m": dict(kernel_size=[7, 7, 7, 7, 7], Decom=True),
    "strips_n_above_m": dict(kernel_size=[13, 11, 9, 7, 11], Decom=True),
}


def _official_slak(kw: dict, seed: int = 0) -> tuple[SLaK, dict]:
    model = _randomized(SLaK(**slak_kwargs(**kw)), seed)
    return model, _rename(model.state_dict(), _SLAK_TO_OFFICIAL)


def _slak_lk_reference(x: torch.Tensor, sd: dict, pre: str, m: int, n: int, decom: bool, bn: bool) -> torch.Tensor:
    """LK.md §5.1 from the official tensors: the branches, their (kh//2, kw//2) padding and the N < M rule."""
    c = x.shape[1]

    def branch(name: str, pad: tuple[int, int]) -> torch.Tensor:
        y = F.conv2d(x, sd[f"{pre}{name}.conv.weight"], padding=pad, groups=c)
        return _bn(y, sd, f"{pre}{name}.bn.") if bn else y

    if decom:
        y = branch("LoRA1", (m // 2, n // 2)) + branch("LoRA2", (n // 2, m // 2))
    else:
        y = branch("lkb_origin", (m // 2, m // 2))
    if n < m:
        y = y + branch("small_conv", (n // 2, n // 2))
    return y


@pytest.mark.parametrize("name", sorted(SLAK_CONFIGS))
def test_slak_every_official_form(name):
    kw = {**_SLAK_BASE, **SLAK_CONFIGS[name]}
    source, sd = _official_slak(kw)
    decom, bn = bool(kw.get("Decom")), kw.get("bn", True)
    ks = kw["kernel_size"]
    assert any(".small_conv." in k for k in sd) == any(m > ks[4] for m in ks[:4])
    model = from_official("slak", sd, **kw)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        y = model(x)
        assert _max_diff(y, source(x)) <= TOL
        # each large kernel computes what the official module computes with these tensors
        for i, stage in enumerate(model.stages):
            h = torch.randn(1, model.dims[i], 11, 13)
            for j, block in enumerate(stage):
                ref = _slak_lk_reference(h, sd, f"stages.{i}.{j}.large_kernel.", ks[i], ks[4], decom, bn)
                assert _max_diff(block.large_kernel(h), ref) <= 1e-5, (i, j)
        deploy = lkvision.reparameterize(model)
        assert _max_diff(deploy(x), y) <= TOL
    if not decom and bn:  # the official deploy form: merge_kernel() on every dense kernel (LK.md §1.3)
        dsd = {k: v for k, v in sd.items() if ".lkb_origin." not in k and ".small_conv." not in k}
        for i, stage in enumerate(model.stages):
            for j in range(len(stage)):
                pre = f"stages.{i}.{j}.large_kernel."
                w, b = _fuse(sd, pre + "lkb_origin.")
                if ks[4] < ks[i]:
                    ws, bs = _fuse(sd, pre + "small_conv.")
                    w, b = w + F.pad(ws, [(ks[i] - ks[4]) // 2] * 4), b + bs
                dsd[pre + "lkb_reparam.weight"], dsd[pre + "lkb_reparam.bias"] = w, b
        merged = from_official("slak", dsd, **kw)
        with torch.no_grad():
            assert _max_diff(merged(x), y) <= TOL


def test_slak_downstream_backbone_checkpoint():
    """segmentation/slak.py: norm0..3 per output, no classifier; inside an mmseg checkpoint (backbone.*)."""
    kw = {**_SLAK_BASE, **SLAK_CONFIGS["dense_small3"]}
    source, sd = _official_slak(kw, seed=3)
    g = torch.Generator().manual_seed(5)
    backbone = {k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    for i, c in enumerate(source.dims):
        backbone[f"norm{i}.weight"] = torch.rand(c, generator=g) + 0.5
        backbone[f"norm{i}.bias"] = torch.randn(c, generator=g) * 0.1
    mmseg = {"backbone." + k: v for k, v in backbone.items()}
    mmseg.update({"decode_head.conv_seg.weight": torch.zeros(4, 8, 1, 1), "auxiliary_head.bias": torch.zeros(4)})
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        stages = source.forward_intermediates(x, intermediates_only=True)
        for out_indices, ckpt in (([0, 1, 2, 3], backbone), ([1, 3], mmseg)):
            model = from_official("slak", ckpt, **kw, out_indices=out_indices)
            assert model.features_only and model.out_indices == tuple(out_indices)
            ref = [_layer_norm_cf(stages[i], backbone, f"norm{i}.") for i in out_indices]
            assert _max_diff(model(x), ref) <= TOL
        derived = from_official("slak", backbone, **kw)  # out_indices from the norm keys
        assert derived.out_indices == (0, 1, 2, 3)


def test_slak_configuration_errors():
    kw = {**_SLAK_BASE, **SLAK_CONFIGS["dense_small3"]}
    _, sd = _official_slak(kw)
    with pytest.raises(CheckpointError, match="pass Decom=False"):
        from_official("slak", sd, **{**kw, "Decom": True})
    _, strips = _official_slak({**_SLAK_BASE, **SLAK_CONFIGS["strips"]})
    with pytest.raises(CheckpointError, match="pass Decom=True"):
        from_official("slak", strips, **{**_SLAK_BASE, **SLAK_CONFIGS["strips"], "Decom": False})
    with pytest.raises(ValueError, match="odd"):
        SLaK(**slak_kwargs(**{**_SLAK_BASE, "kernel_size": [12, 11, 9, 7, 3], "Decom": False}))
    with pytest.raises(ValueError, match="odd"):
        SLaK(**slak_kwargs(**{**_SLAK_BASE, "kernel_size": [13, 11, 9, 7, 4], "Decom": False}))
    with pytest.raises(ValueError, match=r"\[M1, M2, M3, M4, N\]"):
        slak_kwargs(**{**_SLAK_BASE, "kernel_size": [13, 11, 9, 7]})
    with pytest.raises(TypeError, match="unknown official SLaK arguments"):
        slak_kwargs(**_SLAK_BASE, sparsity=0.4)


# ============================================================================================ RepLKNet
def _deep_fuse_bn(sd: dict) -> dict:
    """RepLKNet's ``deep_fuse_BN()``: every conv + BN pair becomes one biased conv (LK.md §1.3)."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".conv.weight")]:
        p = key[: -len("conv.weight")]
        if p + "bn.weight" not in sd:
            continue
        out[p + "conv.weight"], out[p + "conv.bias"] = _fuse(sd, p)
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out.pop(p + "bn." + s)
    return out


@pytest.mark.parametrize("form", ["train", "deploy"])
def test_replknet_deep_fuse_bn_checkpoints(form):
    kwargs = golden_meta("replknet_dev")["constructor"]["kwargs"]
    golden = golden_tensors("replknet_dev", "" if form == "train" else ".deploy")
    ref = golden["__output__" if form == "train" else "__output_deploy__"]
    fused = _deep_fuse_bn({k: v for k, v in golden.items() if not k.startswith("__")})
    assert not any(".bn." in k for k in fused) and any("pw1.conv.bias" in k for k in fused)
    model = from_official("replknet", fused, **kwargs)
    with torch.no_grad():
        assert _max_diff(model(golden["__input__"]), ref) <= TOL
        assert _max_diff(lkvision.reparameterize(model)(golden["__input__"]), ref) <= TOL


def test_replknet_without_small_kernel_and_with_other_stage_counts():
    """small_kernel=None (RepLKNet-XL): no small_conv; the large kernel is BN(DW K x K) alone. And the official
    constructor takes any number of stages (len(layers))."""
    kwargs = golden_meta("replknet_dev")["constructor"]["kwargs"]
    golden = golden_tensors("replknet_dev")
    sd = {k: v for k, v in golden.items() if not k.startswith("__") and ".small_conv." not in k}
    model = from_official("replknet", sd, **{**kwargs, "small_kernel": None})
    with torch.no_grad():
        for i, stage in enumerate(model.stages):
            k = kwargs["large_kernel_sizes"][i]
            for j in range(0, len(stage), 2):
                lk = stage[j].large_kernel
                h = torch.randn(1, lk.channels, 9, 11)
                pre = f"stages.{i}.blocks.{j}.large_kernel.lkb_origin."
                ref = _bn(F.conv2d(h, sd[pre + "conv.weight"], padding=k // 2, groups=lk.channels), sd, pre + "bn.")
                assert lk.small is None and _max_diff(lk(h), ref) <= 1e-5
        x = golden["__input__"]
        assert _max_diff(lkvision.reparameterize(model)(x), model(x)) <= TOL
    # three stages: the first three stages of the golden model, with a head of the third stage's width
    feats = golden_tensors("replknet_dev", ".features")
    three = {k: v for k, v in golden.items()
             if not k.startswith(("__", "stages.3.", "transitions.2.", "norm.", "head."))}
    c3 = kwargs["channels"][2]
    three.update({"norm.weight": torch.ones(c3), "norm.bias": torch.zeros(c3), "norm.running_mean": torch.zeros(c3),
                  "norm.running_var": torch.ones(c3), "norm.num_batches_tracked": torch.tensor(0),
                  "head.weight": torch.zeros(10, c3), "head.bias": torch.zeros(10)})
    kw3 = {**kwargs, "large_kernel_sizes": kwargs["large_kernel_sizes"][:3], "layers": kwargs["layers"][:3],
           "channels": kwargs["channels"][:3], "num_classes": 10}
    model3 = from_official("replknet", three, **kw3)
    with torch.no_grad():
        outs = model3.forward_intermediates(golden["__input__"], intermediates_only=True)
    assert len(outs) == 3
    for i, out in enumerate(outs):
        last = 2 * kwargs["layers"][i] - 1
        ref = feats[f"stages.{i}.blocks.{last}"]
        assert _max_diff(out, ref) <= TOL * max(1.0, float(ref.abs().max())), i


# ========================================================================================= UniRepLKNet
# LK.md §4.1: (kernel, dilation) branches of the dilated reparam block per main kernel K
_DILATED = {17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)), 15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
            13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)), 11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
            9: ((5, 1), (5, 2), (3, 3), (3, 4)), 7: ((5, 1), (3, 2), (3, 3)), 5: ((3, 1), (3, 2))}
# LK.md §4.3 / the official defaults per depth set
_T_STAGE3 = (13, 3) * 9
_S_STAGE3 = (13, 3, 3) * 9
_UNIREP_DEFAULT_KERNELS = {
    (2, 2, 6, 2): ((3, 3), (13, 13), (13,) * 6, (13, 13)),
    (2, 2, 8, 2): ((3, 3), (13, 13), (13,) * 8, (13, 13)),
    (3, 3, 18, 3): ((3, 3, 3), (13, 13, 13), _T_STAGE3, (13, 13, 13)),
    (3, 3, 27, 3): ((3, 3, 3), (13, 13, 13), _S_STAGE3, (13, 13, 13)),
}


def _unirep_to_official(model: UniRepLKNet) -> dict:
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.(\d+)\.dwconv\.branches\.(\d+)\.(conv|bn)\.(.+)", k)
        if m:
            i, j, n, kind, tail = int(m[1]), int(m[2]), int(m[3]), m[4], m[5]
            kk, r = _DILATED[model.kernel_sizes[i][j]][n]
            k = f"stages.{i}.{j}.dwconv.dil_{kind}_k{kk}_{r}.{tail}"
        out[k] = v
    return _rename(out, [
        (r"^stem\.", "downsample_layers.0."),
        (r"^downsamples\.(\d)\.", lambda m: f"downsample_layers.{int(m[1]) + 1}."),
        (r"^feature_norms\.(\d)\.", r"norm\1."),
        (r"\.dwconv\.main\.conv\.", ".dwconv.lk_origin."),
        (r"\.dwconv\.main\.bn\.", ".dwconv.origin_bn."),
        (r"\.dwconv_bn\.", ".norm."),
        (r"\.fc1\.", ".pwconv1.1."),
        (r"\.grn\.", ".act.1."),
        (r"\.fc2\.", ".pwconv2.0."),
        (r"\.fc2_bn\.", ".pwconv2.2."),
        (r"\.layer_scale\.gamma$", ".gamma"),
    ])


def _unirep_dwconv_reference(x: torch.Tensor, sd: dict, pre: str, k: int) -> torch.Tensor:
    """LK.md §4.1-4.2: dwconv (+ dilated branches) followed by the block BN ``norm``; K = 0: identity."""
    if k == 0:
        return x
    c = x.shape[1]
    if k in (3, 5):
        y = F.conv2d(x, sd[pre + "dwconv.weight"], padding=k // 2, groups=c)
    else:
        y = _bn(F.conv2d(x, sd[pre + "dwconv.lk_origin.weight"], padding=k // 2, groups=c), sd,
                pre + "dwconv.origin_bn.")
        for kk, r in _DILATED[k]:
            y = y + _bn(F.conv2d(x, sd[f"{pre}dwconv.dil_conv_k{kk}_{r}.weight"], padding=(r * (kk - 1) + 1) // 2,
                                 dilation=r, groups=c), sd, f"{pre}dwconv.dil_bn_k{kk}_{r}.")
    return _bn(y, sd, pre + "norm.")


@pytest.mark.parametrize(("kernel_sizes", "layer_scale"), [(((0,), (5,), (7, 9), (11,)), 1e-6),
                                                           (((15,), (17,), (3, 0), (13,)), None)],
                         ids=["k0_5_7_9_11", "k15_17_3_0_13_no_layer_scale"])
def test_unireplknet_every_block_kernel_size(kernel_sizes, layer_scale):
    kw = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=kernel_sizes,
              layer_scale_init_value=layer_scale, num_classes=21841)
    source = _randomized(UniRepLKNet(**unirep_kwargs(**kw)), 7)
    sd = _unirep_to_official(source)
    assert ("stages.0.0.gamma" in sd) == (layer_scale is not None)
    model = from_official("unireplknet", {"module." + k: v for k, v in sd.items()}, **kw)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 21841) and _max_diff(y, source(x)) <= TOL
        for i, stage in enumerate(model.stages):
            for j, block in enumerate(stage):
                h = torch.randn(1, model.dims[i], 21, 23)
                ref = _unirep_dwconv_reference(h, sd, f"stages.{i}.{j}.", kernel_sizes[i][j])
                assert _max_diff(block.dwconv_bn(block.dwconv(h)), ref) <= 1e-5, (i, j)
        deploy = lkvision.reparameterize(model)
        assert _max_diff(deploy(x), y) <= TOL
        # the deployed weights load as the official deploy form (deploy=True, recognised from the keys)
        again = from_official("unireplknet", _unirep_to_official(deploy), **kw)
        assert _max_diff(again(x), y) <= TOL


def test_unireplknet_variants_and_in22k_head():
    """A/F/P/N/T/S/B/L/XL: each depth set gets the official default kernel sizes; an IN-22k checkpoint loaded
    without num_classes says which num_classes to pass."""
    official = {  # the official unireplknet.py: variant -> (depths, first-stage width; widths double per stage)
        "a": ((2, 2, 6, 2), 40), "f": ((2, 2, 6, 2), 48), "p": ((2, 2, 6, 2), 64), "n": ((2, 2, 8, 2), 80),
        "t": ((3, 3, 18, 3), 80), "s": ((3, 3, 27, 3), 96), "b": ((3, 3, 27, 3), 128),
        "l": ((3, 3, 27, 3), 192), "xl": ((3, 3, 27, 3), 256)}
    assert set(UNIREP_VARIANTS) == {f"unireplknet_{v}" for v in official}
    for v, (depths, width) in official.items():
        kw = UNIREP_VARIANTS[f"unireplknet_{v}"]
        assert tuple(kw["depths"]) == depths and tuple(kw["dims"]) == tuple(width * 2**i for i in range(4)), v
    for depths, kernels in _UNIREP_DEFAULT_KERNELS.items():  # the default kernel sizes of each depth set
        tiny = UniRepLKNet(**unirep_kwargs(depths=depths, dims=(8, 16, 24, 32)))
        assert tuple(tuple(k) for k in tiny.kernel_sizes) == kernels, depths
    kwargs = golden_meta("unireplknet_dev")["constructor"]["kwargs"]
    sd = {k: v for k, v in golden_tensors("unireplknet_dev").items() if not k.startswith("__")}
    sd["head.weight"], sd["head.bias"] = torch.zeros(21841, sd["head.weight"].shape[1]), torch.zeros(21841)
    with pytest.raises(CheckpointError, match="pass num_classes=21841"):
        from_official("unireplknet", sd, **kwargs)
    model = from_official("unireplknet", sd, **{**kwargs, "num_classes": 21841})
    assert model.head.out_features == 21841


# ========================================================================================== ShiftWise
_SW_BASE = dict(depths=[1, 1, 1, 1], dims=[16, 32, 48, 64])
SW_CONFIGS = {
    "one_path_one_edge": dict(kernel_size=[13, 11, 9, 7, 3], N_path=1, N_rep=1),
    "three_paths_no_ghost": dict(kernel_size=[13, 11, 9, 7, 3], N_path=3, N_rep=2, ghost_ratio=0.0),
    "six_edges_half_ghost": dict(kernel_size=[13, 11, 9, 7, 3], N_path=2, N_rep=6, ghost_ratio=0.5),
    "small_kernel_5": dict(kernel_size=[15, 11, 9, 7, 5], N_path=2, N_rep=3),
    "even_big_kernels": dict(kernel_size=[12, 10, 8, 6, 3]),
    "small_kernel_1": dict(kernel_size=[9, 7, 5, 3, 1], N_rep=2),
    "no_bn_no_layer_scale": dict(kernel_size=[13, 11, 9, 7, 3], bn=False, layer_scale_init_value=0),
    "width_factor": dict(kernel_size=[13, 11, 9, 7, 3], width_factor=1.5, ghost_ratio=0.1),
}


@pytest.mark.parametrize("name", sorted(SW_CONFIGS))
def test_shiftwise_any_paths_edges_ghosts_and_kernels(name):
    kw = {**_SW_BASE, **SW_CONFIGS[name]}
    full = {**dict(ghost_ratio=0.23, N_path=2, N_rep=4, bn=True, width_factor=1.0), **kw}
    source = _randomized(ShiftWiseNet(**official_to_lkvision_kwargs(**kw)), 11)
    sd = to_official(source, merged=False)
    # SW.md §1: N_path convs of shape (repN * nk, 1, k, k), repN = int(C (1 - G)) // 2 * 2, nk = ceil(M / k)
    k = kw["kernel_size"][4]
    for i, d in enumerate(kw["dims"]):
        c = int(d * full["width_factor"])
        rep_n = int(c * (1 - full["ghost_ratio"])) // 2 * 2
        nk = math.ceil(kw["kernel_size"][i] / k)
        loras = [key for key in sd if key.startswith(f"stages.{i}.0.large_kernel.LoRAs.")]
        assert len(loras) == full["N_path"]
        assert all(tuple(sd[key].shape) == (rep_n * nk, 1, k, k) for key in loras)
        assert any(key.startswith(f"stages.{i}.0.large_kernel.bn_") for key in sd) == full["bn"]
    model = from_official("sw", sd, **kw).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        y = model(x)
        assert _max_diff(y, source(x)) <= TOL
        assert _max_diff(lkvision.reparameterize(model)(x), y) <= TOL
        # SW.md §1/§6: the Rep branches are summed before the shift, so the official merge_branches() form
        # (one LoRA = the sum of the LoRAs) computes the same function
        merged = {re.sub(r"LoRAs\.0\.", "LoRA.", key): v for key, v in sd.items() if ".LoRAs." not in key
                  or ".LoRAs.0." in key}
        for key in [key for key in merged if key.endswith("large_kernel.LoRA.weight")]:
            pre = key[: -len("LoRA.weight")]
            merged[key] = sum(sd[f"{pre}LoRAs.{b}.weight"] for b in range(full["N_path"]))
        assert _max_diff(from_official("sw", merged, **kw).eval()(x), y) <= TOL


def test_shiftwise_downstream_backbone_and_unknown_arguments():
    kw = {**_SW_BASE, **SW_CONFIGS["three_paths_no_ghost"]}
    source = _randomized(ShiftWiseNet(**official_to_lkvision_kwargs(**kw)), 13)
    sd = {k: v for k, v in to_official(source).items() if not k.startswith(("norm.", "head."))}
    g = torch.Generator().manual_seed(2)
    for i, c in enumerate(kw["dims"]):
        sd[f"norm{i}.weight"], sd[f"norm{i}.bias"] = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    mmdet = {"module.backbone." + k: v for k, v in sd.items()} | {"module.neck.lateral.weight": torch.zeros(3)}
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        stages = source.forward_intermediates(x, intermediates_only=True)
        model = from_official("sw", mmdet, **kw, out_indices=[0, 2], init_cfg=None).eval()
        assert model.features_only and model.out_indices == (0, 2)
        assert _max_diff(model(x), [_layer_norm_cf(stages[i], sd, f"norm{i}.") for i in (0, 2)]) <= TOL
        # the stages after the last output are removed (timm's features_only semantics), and so are their keys
        removed = r"norm[13]\.|(stages|downsample_layers)\.3\."
        assert to_official(model).keys() == {k for k in sd if not re.match(removed, k)}
    with warnings.catch_warnings(record=True) as caught:  # the official constructor swallows **kwargs
        warnings.simplefilter("always")
        from_official("sw", to_official(source), **kw, use_checkpoint=True)
    assert any("use_checkpoint" in str(w.message) for w in caught)
