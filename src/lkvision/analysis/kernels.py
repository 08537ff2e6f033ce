"""Kernel analysis: aggregated |kernel| maps before / after re-parameterization (RepLKNet App. D), and the
SLaK-strip -> Shiftwise layout (SW paper §3.2, experiment #1).

* "before re-param": the large branch(es) of a layer with their BN fused, no small/dilated branches (for
  a Shiftwise layer: the cross ``kh + kv + ks`` of :func:`lkvision.ops.fold_shiftwise_weight` applied to
  the summed Rep-branch weight, before the BNs and the identity).
* "after re-param": the exact equivalent kernel of the deploy form, measured as the layer's impulse
  response (gradient of the central output with respect to the input), so it works for any depth-wise
  layer whatever its internal structure.

Aggregation (App. D): ``sum_c |K_c|``, rescaled to [0, 1].

A dilated depth-wise conv (MobileNetV2 with ``dilation``, RepLKNet App. C) counts as a large-kernel layer
too: a k x k kernel with dilation r *is* a sparse dense kernel of size r(k-1)+1, and both maps show it on
that dense grid (taps every r pixels, zeros between).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

__all__ = [
    "aggregate_kernel", "equivalent_kernel", "large_branch_kernel", "shiftwise_cross_kernel",
    "find_kernel_layers", "default_kernel_layer", "kernel_maps", "strip_to_shiftwise_weight",
]

_LAYER_CLASSES = ("ShiftWiseConv2d", "ReparamLargeKernelConv", "DilatedReparamConv", "StripConv")


def aggregate_kernel(kernel: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(C, [1,] kh, kw) -> (kh, kw): ``sum_c |K_c|``, divided by its maximum when ``normalize``."""
    k = kernel.detach().double()
    if k.ndim == 4:
        k = k[:, 0]
    if k.ndim != 3:
        raise ValueError(f"expected a (C, kh, kw) or (C, 1, kh, kw) kernel, got shape {tuple(kernel.shape)}")
    a = k.abs().sum(0)
    m = a.max()
    return a / m if normalize and m > 0 else a


def _channels(layer: nn.Module) -> int:
    for attr in ("channels", "in_channels", "dim", "num_channels"):
        v = getattr(layer, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"cannot tell the input channels of {type(layer).__name__}; pass channels=")


def _extent_guess(layer: nn.Module) -> int:
    ext = 1
    for attr in ("kernel_size", "big_kernel", "strip_length"):
        v = getattr(layer, attr, None)
        if isinstance(v, int):
            ext = max(ext, v)
        elif isinstance(v, (tuple, list)) and v and all(isinstance(i, int) for i in v):
            ext = max(ext, *v)
    for p in layer.parameters():
        if p.ndim == 4:
            ext = max(ext, *p.shape[-2:])
    for c in layer.modules():  # a dilated conv reaches d(k-1)+1 pixels
        if isinstance(c, nn.Conv2d):
            ext = max(ext, *(d * (k - 1) + 1 for d, k in zip(c.dilation, c.kernel_size)))
    return ext


def _crop_centred(k: torch.Tensor) -> torch.Tensor:
    """Crop (C, S, S) to the smallest centred square holding every non-zero tap."""
    S = k.shape[-1]
    c = S // 2
    nz = (k != 0).any(0).nonzero()
    if nz.numel() == 0:
        return k[:, c:c + 1, c:c + 1]
    r = int((nz - c).abs().max())
    return k[:, c - r:c + r + 1, c - r:c + r + 1]


def equivalent_kernel(layer: nn.Module, channels: int | None = None, select: torch.Tensor | None = None,
                      max_size: int = 513) -> torch.Tensor:
    """Exact equivalent depth-wise kernel of a stride-1 'same' linear layer in eval mode: (C', kh, kw).

    Entry ``[c, dy, dx]`` (centre = middle) is the weight of input ``x[c, y+dy, x+dx]`` in the outputs at
    (y, x), summed over output channels (for a depth-wise layer: the kernel of channel c; channel order
    changes such as Shiftwise's rep-then-ghost do not matter). ``select``: input channels to keep (e.g. a
    Shiftwise layer's ``rep_idx``). Computed in float64 on a zero map grown until the response no longer
    touches its border; the result is cropped to the smallest centred square.
    """
    C = channels or _channels(layer)
    net = copy.deepcopy(layer).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    p0 = next(iter(layer.parameters()), None)
    device = p0.device if p0 is not None else torch.device("cpu")
    net.to(device)
    S = 2 * _extent_guess(layer) + 3
    while True:
        x = torch.zeros(1, C, S, S, dtype=torch.float64, device=device, requires_grad=True)
        with torch.enable_grad():
            y = net(x)
            if y.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"{type(layer).__name__} changes the spatial size ({S} -> "
                                 f"{tuple(y.shape[-2:])}): equivalent_kernel needs a stride-1 'same' layer")
            (g,) = torch.autograd.grad(y[:, :, S // 2, S // 2].sum(), x)
        g = g[0].cpu()
        ring = torch.cat([g[:, 0], g[:, -1], g[:, :, 0], g[:, :, -1]], dim=1)
        if not bool((ring != 0).any()) or S >= max_size:
            break
        S = 2 * S + 1
    if select is not None:
        g = g[select.cpu()]
    return _crop_centred(g)


def shiftwise_cross_kernel(layer: nn.Module) -> torch.Tensor:
    """Training-form cross kernel of a Shiftwise layer: (R, L', L') with ``kh`` (k x L) on the centre rows,
    ``kv`` (L x k) on the centre columns and ``ks`` at the centre (no BN, no identity), from
    :func:`lkvision.ops.fold_shiftwise_weight` of the summed Rep-branch weight."""
    from ..ops.shift_add import fold_shiftwise_weight, strip_paddings

    if getattr(layer, "deployed", False):
        raise ValueError("the layer is already re-parameterized; its training-form branches are gone")
    w = layer.merged_weight().detach().double()
    M, k = layer.big_kernel, layer.small_kernel
    kh, kv, ks = fold_shiftwise_weight(w, layer.pad_hv, layer.idx_identit, M, k)
    (left, right, _, _), _ = strip_paddings(M, k)
    r = max(left, right)  # the footprint is [-left, +right]; centre it in a (2r+1)^2 grid
    R, L = kh.shape[0], kh.shape[-1]
    out = w.new_zeros(R, 2 * r + 1, 2 * r + 1)
    c, h = r, k // 2
    out[:, c - h:c + h + 1, c - left:c - left + L] += kh[:, 0]
    out[:, c - left:c - left + L, c - h:c + h + 1] += kv[:, 0]
    out[:, c - h:c + h + 1, c - h:c + h + 1] += ks[:, 0]
    return out


def large_branch_kernel(layer: nn.Module) -> torch.Tensor:
    """Kernel of the large branch(es) of a re-parameterizable layer, BN fused: (C, K, K).

    Shiftwise layers: :func:`shiftwise_cross_kernel`. Others: the dense depth-wise conv(s) of largest area
    among the layer's ConvBN branches (SLaK's two strips both count), centre-padded to a common size; a
    layer with only dilated depth-wise convs gives them on their dense grid
    (:func:`lkvision.layers.dilated.dilated_to_dense`)."""
    from ..layers.conv_bn import ConvBN, pad_kernel_to
    from ..layers.dilated import dilated_to_dense

    if hasattr(layer, "pad_hv") and hasattr(layer, "branches"):
        return shiftwise_cross_kernel(layer)
    cands, dilated = [], []
    for m in layer.modules():
        if isinstance(m, ConvBN) and m.conv.groups == m.conv.in_channels and m.conv.groups > 1:
            w, _ = m.fused_weight_bias()
            w = w.detach().double()
        elif isinstance(m, nn.Conv2d) and not any(m is getattr(p, "conv", None) for p in layer.modules()):
            if not (m.groups == m.in_channels and m.groups > 1):
                continue
            w = m.weight.detach().double()
        else:
            continue
        conv = m.conv if isinstance(m, ConvBN) else m
        if tuple(conv.dilation) == (1, 1):
            cands.append(w)
        else:
            dilated.append(dilated_to_dense(w, tuple(conv.dilation)))
    cands = cands or dilated
    if not cands:
        raise ValueError(f"{type(layer).__name__} has no depth-wise conv branch")
    area = max(w.shape[-2] * w.shape[-1] for w in cands)
    big = [w for w in cands if w.shape[-2] * w.shape[-1] == area]
    K = max(max(w.shape[-2:]) for w in big)
    return sum(pad_kernel_to(w, (K, K)) for w in big)[:, 0]


def _dilated_depthwise(m: nn.Module) -> bool:
    """A depth-wise conv (``nn.Conv2d`` or a ``ConvBN`` around one) with dilation > 1."""
    conv = getattr(m, "conv", None) if not isinstance(m, nn.Conv2d) else m
    if not isinstance(conv, nn.Conv2d):
        return False
    return conv.groups == conv.in_channels == conv.out_channels > 1 and max(conv.dilation) > 1


def _stride(m: nn.Module) -> tuple[int, ...]:
    s = getattr(m, "stride", None)
    if s is None:
        s = next((c.stride for c in m.modules() if isinstance(c, nn.Conv2d)), 1)
    return tuple(s) if isinstance(s, (tuple, list)) else (int(s),)


def find_kernel_layers(model: nn.Module) -> list[str]:
    """Names of the re-parameterizable large-kernel layers (Shiftwise, RepLK, dilated re-param, strip) and of
    stand-alone dilated depth-wise convs, in order (modules inside a listed layer are not listed)."""
    names: list[str] = []
    for n, m in model.named_modules():
        if names and n.startswith(names[-1] + "."):
            continue
        if type(m).__name__ in _LAYER_CLASSES or _dilated_depthwise(m):
            names.append(n)
    return names


def default_kernel_layer(model: nn.Module) -> str:
    """App. D's choice: the first stride-1 large-kernel layer of the last stage that has one (any stride
    when the model has no stride-1 layer)."""
    names = find_kernel_layers(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no re-parameterizable large-kernel layer "
                         f"({', '.join(_LAYER_CLASSES)}) or dilated depth-wise conv")
    mods = dict(model.named_modules())
    names = [n for n in names if set(_stride(mods[n])) == {1}] or names
    stage = [re.search(r"stages\.(\d+)\.", n) for n in names]
    idx = [int(s.group(1)) if s else -1 for s in stage]
    last = max(idx)
    return next(n for n, i in zip(names, idx) if i == last)


def kernel_maps(model: nn.Module, layer: str | None = None, normalize: bool = True) -> dict[str, torch.Tensor]:
    """``{"before re-param": (K, K), "after re-param": (K', K')}`` aggregated |kernel| maps of one layer
    (``layer``: module name; default :func:`default_kernel_layer`)."""
    import lkvision

    name = layer or default_kernel_layer(model)
    mods = dict(model.named_modules())
    if name not in mods:
        raise ValueError(f"no module named {name!r}; large-kernel layers: {find_kernel_layers(model)[:12]}")
    m = mods[name]
    before = large_branch_kernel(m)
    select = getattr(m, "rep_idx", None)
    deployed = lkvision.reparameterize(m, inplace=False)
    after = equivalent_kernel(deployed, channels=_channels(m), select=select)
    return {"before re-param": aggregate_kernel(before, normalize),
            "after re-param": aggregate_kernel(after, normalize)}


def strip_to_shiftwise_weight(
    strip: torch.Tensor, pad_hv: torch.Tensor, big_kernel: int | None = None, small_kernel: int = 3,
    direction: str = "h", edge: int = 0,
) -> torch.Tensor:
    """Lay a SLaK strip kernel out as Shiftwise k x k filters (SW §3.2 #1, official ``reloc_w``).

    ``strip``: (R, 1, k, M) for ``direction="h"`` (a k x M strip, 'same' padding (k//2, M//2)) or (R, 1, M, k)
    for ``"v"``. The long side is zero-padded at its far end to L = k*ceil(M/k) (the Shiftwise footprint
    starts at -M//2 like the strip's), cut into nk tiles of k x k, and tile i goes to the filter that the
    tables put in block i: filter j of channel c sits in block ``(M//2 - (k-1) - pad_hv[c*nk+j, col]) / k``,
    with col = ``edge`` (horizontal) or ``E + edge`` (vertical).

    Returns the (R*nk, 1, k, k) conv weight. With one edge (E = 1) the op's matching output equals the strip
    depth-wise conv exactly (H_out for "h", V_out for "v"); with E > 1 the other edges add their own terms.
    Differentiable with respect to ``strip``.
    """
    from ..ops.shift_add import num_blocks, shift_offsets

    if direction not in ("h", "v"):
        raise ValueError(f"direction must be 'h' or 'v', got {direction!r}")
    if strip.ndim != 4 or strip.shape[1] != 1:
        raise ValueError(f"strip must be (R, 1, k, M) or (R, 1, M, k), got {tuple(strip.shape)}")
    k = small_kernel
    short, M = (strip.shape[2], strip.shape[3]) if direction == "h" else (strip.shape[3], strip.shape[2])
    if short != k:
        raise ValueError(f"a {direction!r} strip must have its short side = small_kernel = {k}, got "
                         f"shape {tuple(strip.shape)}")
    if big_kernel is not None and big_kernel != M:
        raise ValueError(f"strip length {M} differs from big_kernel={big_kernel}")
    nk = num_blocks(M, k)
    L = k * nk
    R = strip.shape[0]
    E = pad_hv.shape[1] // 2
    if tuple(pad_hv.shape) != (R * nk, 2 * E) or not 0 <= edge < E:
        raise ValueError(f"pad_hv must be (R*nk, 2E) = ({R * nk}, 2E) with 0 <= edge < E, got "
                         f"{tuple(pad_hv.shape)} and edge={edge}")
    s = strip[:, 0] if direction == "h" else strip[:, 0].transpose(1, 2)  # (R, k, M): long side last
    s = nn.functional.pad(s, (0, L - M))
    tiles = s.reshape(R, k, nk, k).permute(0, 2, 1, 3)  # (R, nk, k, k): tile i = columns k*i .. k*i+k-1
    if direction == "v":
        tiles = tiles.transpose(2, 3)  # back to (rows of the block, columns)
    col = edge if direction == "h" else E + edge
    block_of = {o: i for i, o in enumerate(shift_offsets(M, k))}  # offset rp[i] -> block i
    offs = pad_hv[:, col].tolist()
    bad = sorted({o for o in offs if o not in block_of})
    if bad:
        raise ValueError(f"pad_hv column {col} holds offsets {bad[:5]} not in shift_offsets({M}, {k})")
    blk = torch.tensor([block_of[o] for o in offs], device=strip.device).view(R, nk)
    w = torch.gather(tiles, 1, blk[:, :, None, None].expand(R, nk, k, k))
    return w.reshape(R * nk, 1, k, k)
