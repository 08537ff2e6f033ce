"""The ShiftWise shift-add operator (SW.md sections 1-2) and its folded large-kernel form.

Notation: R rep channels, small kernel k (3 or 5), big kernel M, nk = ceil(M / k) blocks, E edges,
P = k - 1 (conv padding), e = P - k // 2 (extra pad), mid = M // 2, L = k * nk.

* ``shift_add``: the op on the grouped-conv output X (B, R*nk, H+2e, W+2e) -> (H_out, V_out, S_out), each
  (B, R, H, W), in the gather form of SW.md section 2 (zero outside X; a repeated identity pick counts twice).
* ``fold_shiftwise_weight``: the (R*nk, 1, k, k) conv weight -> equivalent strips kh (R,1,k,L), kv (R,1,L,k)
  and the small kernel ks (R,1,k,k).
* ``shiftwise_conv``: conv + shift-add from the rep channels x (B, R, H, W), either literally ("reference")
  or as three depth-wise strip convs of the folded kernels ("fast").
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autoselect
from ._fx import fx_leaf
from .dwconv import DWCONV_IMPLS, _device_name, _memory_layout, dwconv2d, dwconv2d_sum, normalize_padding
from .kernels._common import autocast_dtype, autocast_inputs, needs_grad

__all__ = [
    "shift_offsets", "num_blocks", "make_shift_tables", "shift_add", "fold_shiftwise_weight", "strip_paddings",
    "shiftwise_conv", "SHIFT_ADD_IMPLS",
]

SHIFT_ADD_IMPLS = ("auto", "reference", "fast")


# ----------------------------------------------------------------------------------------------- geometry
def _check_kernels(big_kernel: int, small_kernel: int) -> None:
    if not isinstance(small_kernel, int) or small_kernel < 1 or small_kernel % 2 == 0:
        raise ValueError(f"shift-add: small_kernel must be a positive odd int, got {small_kernel!r}")
    if not isinstance(big_kernel, int) or big_kernel < small_kernel:
        raise ValueError(f"shift-add: big_kernel (M={big_kernel!r}) must be an int >= small_kernel "
                         f"(N={small_kernel})")


def num_blocks(big_kernel: int, small_kernel: int = 3) -> int:
    """nk = ceil(M / k): the number of k x k filters per rep channel."""
    _check_kernels(big_kernel, small_kernel)
    return math.ceil(big_kernel / small_kernel)


def shift_offsets(big_kernel: int, small_kernel: int = 3) -> list[int]:
    """rp[i] = M//2 - i*k - (k-1), i = 0..nk-1: the shift applied to block i (M=51, k=3: 23, 20, ..., -25)."""
    nk = num_blocks(big_kernel, small_kernel)
    mid, pad = big_kernel // 2, small_kernel - 1
    return [mid - i * small_kernel - pad for i in range(nk)]


def _extra_pad(small_kernel: int) -> int:
    return (small_kernel - 1) - small_kernel // 2


def strip_paddings(big_kernel: int, small_kernel: int = 3, strip_len: int | None = None
                   ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """F.pad-style (left, right, top, bottom) paddings of the horizontal (k x L) and vertical (L x k) strips.

    The one definition of the SW strip geometry (the ops, the Triton kernels, the layer's deploy form and the
    kernel analysis use it): the horizontal footprint is columns [x - mid, x - mid + L - 1] (M=49, k=3:
    -24..+26), L = ``strip_len`` (default k * ceil(M / k))."""
    L = small_kernel * num_blocks(big_kernel, small_kernel) if strip_len is None else strip_len
    mid, h = big_kernel // 2, small_kernel // 2
    return (mid, L - 1 - mid, h, h), (h, h, mid, L - 1 - mid)


# ----------------------------------------------------------------------------------------------- tables
def make_shift_tables(channels: int, big_kernel: int, small_kernel: int = 3, edges: int = 4,
                      seed: int | None = 123, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The official shuffle tables, bit-identical to ``AddShift_mp_module`` with ``torch.manual_seed(123)``.

    Draw order: for each edge, for each channel: randperm(nk) (horizontal); the same for vertical; then for each
    edge randint(0, nk, [channels]) (identity). Block i of edge e holds filter pi(i), so filter j gets the offset
    rp[pi^-1(j)]. The global RNG is never touched: a local CPU generator seeded with ``seed`` is used (or
    ``generator`` if given; ``seed=None`` without generator draws a fresh random seed).

    Returns:
        pad_hv: int32 (channels*nk, 2*edges), columns [0, edges) horizontal, [edges, 2*edges) vertical offsets.
        idx_identit: int32 (channels, edges), values c*nk + u (the filter used unshifted by edge e).
    """
    if channels < 1 or edges < 1:
        raise ValueError(f"make_shift_tables: channels and edges must be >= 1, got {channels}, {edges}")
    nk = num_blocks(big_kernel, small_kernel)
    rp = torch.tensor(shift_offsets(big_kernel, small_kernel), dtype=torch.int32)
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    pad_hv = torch.empty(channels, nk, 2 * edges, dtype=torch.int32)
    for col in range(2 * edges):  # horizontal edges first, then vertical: the official draw order
        for c in range(channels):
            perm = torch.randperm(nk, generator=generator)
            pad_hv[c, perm, col] = rp  # filter perm[i] sits in block i
    base = torch.arange(channels, dtype=torch.int64) * nk
    idx_identit = torch.empty(channels, edges, dtype=torch.int32)
    for e in range(edges):
        idx_identit[:, e] = (base + torch.randint(0, nk, (channels,), generator=generator)).to(torch.int32)
    return pad_hv.reshape(channels * nk, 2 * edges), idx_identit


def _check_tables(pad_hv: Tensor, idx_identit: Tensor, channels: int, nk: int) -> int:
    """Validate table shapes/dtypes; returns the number of edges."""
    for name, t in (("pad_hv", pad_hv), ("idx_identit", idx_identit)):
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() != 2:
            raise ValueError(f"shift-add: {name} must be a 2-D int32/int64 tensor, got "
                             f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}")
    edges = idx_identit.shape[1]
    if edges < 1 or idx_identit.shape[0] != channels:
        raise ValueError(f"shift-add: idx_identit must have shape (R={channels}, E>=1), got "
                         f"{tuple(idx_identit.shape)}")
    if tuple(pad_hv.shape) != (channels * nk, 2 * edges):
        raise ValueError(f"shift-add: pad_hv must have shape (R*nk={channels * nk}, 2*E={2 * edges}), got "
                         f"{tuple(pad_hv.shape)}")
    return edges


def _block_index(pad_hv: Tensor, big_kernel: int, small_kernel: int) -> Tensor:
    """Block index i of each (filter, column) from its offset rp[i]; errors if an offset is not in rp."""
    nk = num_blocks(big_kernel, small_kernel)
    mid, pad = big_kernel // 2, small_kernel - 1
    d = (mid - pad) - pad_hv.to(torch.int64)
    blk = torch.div(d, small_kernel, rounding_mode="floor")
    checkable = not torch.compiler.is_compiling() and pad_hv.device.type != "meta"  # meta tensors hold no values
    if checkable and bool(((d % small_kernel != 0) | (blk < 0) | (blk >= nk)).any()):
        raise ValueError(f"shift-add: pad_hv holds offsets that are not in shift_offsets({big_kernel}, "
                         f"{small_kernel}) = {shift_offsets(big_kernel, small_kernel)}")
    return blk


def _one_hot(index: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """one_hot without data-dependent checks (compiles without graph breaks)."""
    return (index[..., None] == torch.arange(n, device=index.device)).to(dtype)


# (id(pad_hv), id(idx_identit), M, k, dtype, device) -> (weakrefs, versions, matrices). The tables of a layer
# are constant buffers, so deriving their count matrices once per layer (instead of per call) removes a dozen
# small ops from every forward; identity + version counters make a stale hit impossible.
_ASSIGNMENT_CACHE: dict[tuple, tuple] = {}
_ASSIGNMENT_CACHE_SIZE = 256


def _assignment_matrices(pad_hv: Tensor, idx_identit: Tensor, big_kernel: int, small_kernel: int,
                         dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cached :func:`_compute_assignment_matrices` for plain (eager, non-fake) table tensors."""
    cacheable = (type(pad_hv) is Tensor and type(idx_identit) is Tensor and not torch.compiler.is_compiling()
                 and pad_hv.device.type != "meta")
    if not cacheable:
        return _compute_assignment_matrices(pad_hv, idx_identit, big_kernel, small_kernel, dtype, device)
    key = (id(pad_hv), id(idx_identit), big_kernel, small_kernel, dtype, torch.device(device))
    hit = _ASSIGNMENT_CACHE.get(key)
    if hit is not None:
        (ref_p, ref_i), versions, mats = hit
        if ref_p() is pad_hv and ref_i() is idx_identit and versions == (pad_hv._version, idx_identit._version):
            return mats
    mats = _compute_assignment_matrices(pad_hv, idx_identit, big_kernel, small_kernel, dtype, device)
    if len(_ASSIGNMENT_CACHE) >= _ASSIGNMENT_CACHE_SIZE:
        _ASSIGNMENT_CACHE.pop(next(iter(_ASSIGNMENT_CACHE)))
    _ASSIGNMENT_CACHE[key] = ((weakref.ref(pad_hv), weakref.ref(idx_identit)),
                              (pad_hv._version, idx_identit._version), mats)
    return mats


def _compute_assignment_matrices(pad_hv: Tensor, idx_identit: Tensor, big_kernel: int, small_kernel: int,
                                 dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Count matrices of the tables (exact small integers in any float dtype).

    Ah[c, i, j] (and Av) = number of edges whose block i holds filter j of channel c: (R, nk, nk).
    As[c, j] = number of edges whose identity pick is filter j of channel c: (R, nk).
    Also returns cat([Ah, Av, As[:, None]], 1), (R, 2*nk + 1, nk)."""
    nk = num_blocks(big_kernel, small_kernel)
    channels = idx_identit.shape[0]
    edges = _check_tables(pad_hv, idx_identit, channels, nk)
    blk = _block_index(pad_hv, big_kernel, small_kernel).to(device)  # (R*nk, 2E)
    onehot = _one_hot(blk, nk, dtype).reshape(channels, nk, 2, edges, nk)  # c, j, dir, e, i
    a = onehot.sum(3).permute(2, 0, 3, 1)  # dir, c, i, j
    ident = idx_identit.to(device=device, dtype=torch.int64) - torch.arange(channels, device=device)[:, None] * nk
    if not torch.compiler.is_compiling() and ident.device.type != "meta" and bool(((ident < 0) | (ident >= nk)).any()):
        raise ValueError("shift-add: idx_identit[c, e] must lie in [c*nk, (c+1)*nk) (a filter of channel c)")
    a_s = _one_hot(ident, nk, dtype).sum(1)  # (R, nk)
    # the three stacked, so that folding a weight is one batched matmul: (R, 2*nk + 1, nk)
    stacked = torch.cat([a[0], a[1], a_s[:, None, :]], dim=1).contiguous()
    return a[0].contiguous(), a[1].contiguous(), a_s, stacked


# ----------------------------------------------------------------------------------------------- shift-add
def _shift_add_reference(x: Tensor, pad_hv: Tensor, idx_identit: Tensor, big_kernel: int,
                         small_kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """Literal gather form of SW.md section 2, vectorised over (b, c, j) and looping over edges.

    H[b,c,y,x] = sum_e sum_j X[b, c*nk+j, y+ep, x - ph[c*nk+j, e]]   (0 <= x - ph < Win)
    V[b,c,y,x] = sum_e sum_j X[b, c*nk+j, y - pv[c*nk+j, e], x+ep]   (0 <= y - pv < Hin)
    S[b,c,y,x] = sum_e X[b, idx_identit[c, e], y+ep, x+ep]"""
    nk = num_blocks(big_kernel, small_kernel)
    ep = _extra_pad(small_kernel)
    b, cin, hin, win = x.shape
    r = cin // nk
    h, w = hin - 2 * ep, win - 2 * ep
    edges = idx_identit.shape[1]
    xr = x.reshape(b, r, nk, hin, win)
    ph = pad_hv[:, :edges].to(device=x.device, dtype=torch.int64).reshape(r, nk, edges)
    pv = pad_hv[:, edges:].to(device=x.device, dtype=torch.int64).reshape(r, nk, edges)
    cols = torch.arange(w, device=x.device)
    rows = torch.arange(h, device=x.device)
    out_h = x.new_zeros(b, r, h, w)
    out_v = x.new_zeros(b, r, h, w)
    out_s = x.new_zeros(b, r, h, w)
    for e in range(edges):
        # horizontal: source column x - ph
        src = cols - ph[:, :, e, None]  # (R, nk, W)
        valid = (src >= 0) & (src < win)
        idx = src.clamp(0, win - 1)[None, :, :, None, :].expand(b, r, nk, h, w)
        taken = torch.gather(xr[:, :, :, ep:ep + h, :], 4, idx)
        out_h = out_h + (taken * valid[None, :, :, None, :]).sum(2)
        # vertical: source row y - pv
        src = rows - pv[:, :, e, None]  # (R, nk, H)
        valid = (src >= 0) & (src < hin)
        idx = src.clamp(0, hin - 1)[None, :, :, :, None].expand(b, r, nk, h, w)
        taken = torch.gather(xr[:, :, :, :, ep:ep + w], 3, idx)
        out_v = out_v + (taken * valid[None, :, :, :, None]).sum(2)
        # identity: the chosen filter, unshifted
        pick = idx_identit[:, e].to(device=x.device, dtype=torch.int64)
        out_s = out_s + x.index_select(1, pick)[:, :, ep:ep + h, ep:ep + w]
    return out_h, out_v, out_s


def _shift_sum(y: Tensor, offsets: list[int], dim: int, out_len: int) -> Tensor:
    """sum_i shift(y[:, :, i], offsets[i]) along ``dim`` (of the per-block tensor), zero-filled.

    y: (B, R, nk, A, Bd); out[..., t] = sum_i y[:, :, i, ..., t - offsets[i]] with t in [0, out_len)."""
    src_len = y.shape[dim]
    blocks = []
    for i, s in enumerate(offsets):
        lo, hi = max(0, s), min(out_len, src_len + s)
        blk = y[:, :, i]
        if hi <= lo:
            continue
        piece = blk.narrow(dim - 1, lo - s, hi - lo)
        pads = [0, 0, 0, 0]
        side = 0 if dim - 1 == 3 else 2  # F.pad order: last dim first
        pads[side], pads[side + 1] = lo, out_len - hi
        blocks.append(F.pad(piece, pads) if (lo or out_len - hi) else piece)
    if not blocks:
        shape = list(y[:, :, 0].shape)
        shape[dim - 1] = out_len
        return y.new_zeros(shape)
    out = blocks[0]
    for blk in blocks[1:]:
        out = out + blk
    return out


def _shift_add_fast(x: Tensor, pad_hv: Tensor, idx_identit: Tensor, big_kernel: int,
                    small_kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """Form A of SW.md section 2: gather the filters into block order (a per-channel nk x nk count-matrix
    product, deterministic forward and backward), then sum nk zero-filled shifted slices."""
    nk = num_blocks(big_kernel, small_kernel)
    ep = _extra_pad(small_kernel)
    b, cin, hin, win = x.shape
    r = cin // nk
    h, w = hin - 2 * ep, win - 2 * ep
    a_h, a_v, a_s, _ = _assignment_matrices(pad_hv, idx_identit, big_kernel, small_kernel, x.dtype, x.device)
    rp = shift_offsets(big_kernel, small_kernel)
    xr = x.reshape(b, r, nk, hin * win)
    yh = torch.matmul(a_h, xr).reshape(b, r, nk, hin, win)[:, :, :, ep:ep + h, :]
    yv = torch.matmul(a_v, xr).reshape(b, r, nk, hin, win)[:, :, :, :, ep:ep + w]
    out_h = _shift_sum(yh, rp, 4, w)
    out_v = _shift_sum(yv, rp, 3, h)
    ys = torch.matmul(a_s[:, None, :], xr).reshape(b, r, hin, win)
    out_s = ys[:, :, ep:ep + h, ep:ep + w]
    return out_h.contiguous(), out_v.contiguous(), out_s.contiguous()


def _check_impl(impl: str) -> None:
    if impl not in SHIFT_ADD_IMPLS:
        raise ValueError(f"shift-add: impl must be one of {SHIFT_ADD_IMPLS}, got {impl!r}")


def _check_x(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{what}: expected a 4-D tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise TypeError(f"{what}: unsupported dtype {x.dtype}; use a floating-point tensor")


def shift_add(x: Tensor, pad_hv: Tensor, idx_identit: Tensor, big_kernel: int, small_kernel: int = 3, *,
              impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The shift-add op on the grouped-conv output.

    Args:
        x: X of shape (B, R*nk, H+2e, W+2e), e = (k-1) - k//2.
        pad_hv: (R*nk, 2E) int offsets (horizontal columns first); idx_identit: (R, E) int filter picks.
        impl: "reference" (literal gather form), "fast" (form A) or "auto" (= "fast").

    Returns:
        (H_out, V_out, S_out), each (B, R, H, W).
    """
    _check_impl(impl)
    _check_x(x, "shift_add")
    nk = num_blocks(big_kernel, small_kernel)
    ep = _extra_pad(small_kernel)
    if x.shape[1] % nk != 0:
        raise ValueError(f"shift_add: input channels {x.shape[1]} are not a multiple of nk={nk}")
    if x.shape[2] <= 2 * ep or x.shape[3] <= 2 * ep:
        raise ValueError(f"shift_add: spatial size {tuple(x.shape[2:])} must exceed 2*e = {2 * ep}")
    _check_tables(pad_hv, idx_identit, x.shape[1] // nk, nk)
    if impl == "reference":
        return _shift_add_reference(x, pad_hv, idx_identit, big_kernel, small_kernel)
    return _shift_add_fast(x, pad_hv, idx_identit, big_kernel, small_kernel)


# ----------------------------------------------------------------------------------------------- folding
def fold_shiftwise_weight(weight: Tensor, pad_hv: Tensor, idx_identit: Tensor, big_kernel: int,
                          small_kernel: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Fold the (R*nk, 1, k, k) conv weight into the equivalent large-kernel view.

    Returns:
        kh (R, 1, k, L): column block i = sum_e W[c*nk + pi^h_{e,c}(i)];
        kv (R, 1, L, k): the same along rows with the vertical tables;
        ks (R, 1, k, k): sum_e W[idx_identit[c, e]].
    Differentiable w.r.t. ``weight`` (small count-matrix products; deterministic)."""
    k = small_kernel
    nk = num_blocks(big_kernel, k)
    if weight.dim() != 4 or weight.shape[1] != 1 or tuple(weight.shape[2:]) != (k, k) or weight.shape[0] % nk:
        raise ValueError(f"fold_shiftwise_weight: weight must have shape (R*nk, 1, {k}, {k}) with nk={nk}, "
                         f"got {tuple(weight.shape)}")
    r = weight.shape[0] // nk
    stacked = _assignment_matrices(pad_hv, idx_identit, big_kernel, k, weight.dtype, weight.device)[3]
    folded = torch.bmm(stacked, weight.reshape(r, nk, k * k))  # (R, 2*nk + 1, k*k): one matmul for all three
    bh = folded[:, :nk].reshape(r, nk, k, k)  # c, i, u, v
    kh = bh.permute(0, 2, 1, 3).reshape(r, 1, k, nk * k)
    kv = folded[:, nk:2 * nk].reshape(r, 1, nk * k, k)
    ks = folded[:, 2 * nk].reshape(r, 1, k, k)
    return kh, kv, ks


# ----------------------------------------------------------------------------------------------- conv + shift
SHIFTWISE_CONV_IMPLS = SHIFT_ADD_IMPLS + ("triton",)


def _triton_modules():
    """The Triton kernel modules (lazy import; they import without triton too)."""
    from lkvision.ops.kernels import triton_dwconv, triton_shiftwise

    return triton_dwconv, triton_shiftwise


def _sw_key(x: Tensor, kernels: tuple[Tensor, ...], extra: tuple, train: bool) -> tuple:
    """autoselect key: device (and GPU name), dtype, layout, shape, kernel shapes, training or not (the same
    parts as dwconv2d's key, so that a saved table never matches on another GPU)."""
    return (str(x.device), _device_name(x.device), x.dtype, _memory_layout(x), tuple(x.shape),
            *(tuple(t.shape) for t in kernels), *extra, train)


def shiftwise_strips(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, big_kernel: int, small_kernel: int = 3,
                     *, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The three depth-wise convs of the folded form: x (B, R, H, W) -> (H_out, V_out, S_out)."""
    pad_h, pad_v = strip_paddings(big_kernel, small_kernel)
    if x.device.type == "cpu" and impl in ("auto", "custom"):
        x = x.contiguous(memory_format=torch.channels_last)  # once for the three convs (NHWC kernels are fastest)
    return (dwconv2d(x, kh, None, pad_h, impl=impl), dwconv2d(x, kv, None, pad_v, impl=impl),
            dwconv2d(x, ks, None, "same", impl=impl))


@fx_leaf
def shiftwise_conv(x: Tensor, weight: Tensor, pad_hv: Tensor, idx_identit: Tensor, big_kernel: int,
                   small_kernel: int = 3, *, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Grouped k x k conv (one input channel -> nk filters, padding k-1) followed by shift-add.

    Args:
        x: rep channels (B, R, H, W).
        weight: (R*nk, 1, k, k), the sum of the Rep branches.
        impl: "reference" (conv2d + literal shift_add), "fast" (fold + three strip depth-wise convs),
            "triton" (fold + ONE fused Triton launch for the three strips, :mod:`lkvision.ops.kernels`), or
            "auto": on CUDA with the kernels available, the faster of "triton" and "fast" measured per problem
            (:mod:`lkvision.ops.autoselect`, default "fast" where nothing may be measured); else "fast".

    Returns:
        (H_out, V_out, S_out), each (B, R, H, W).
    """
    if impl not in SHIFTWISE_CONV_IMPLS:
        raise ValueError(f"shiftwise_conv: impl must be one of {SHIFTWISE_CONV_IMPLS}, got {impl!r}")
    _check_x(x, "shiftwise_conv")
    k = small_kernel
    nk = num_blocks(big_kernel, k)
    r = x.shape[1]
    if weight.dim() != 4 or tuple(weight.shape) != (r * nk, 1, k, k):
        raise ValueError(f"shiftwise_conv: weight must have shape (R*nk, 1, k, k) = ({r * nk}, 1, {k}, {k}) for "
                         f"R={r} input channels, M={big_kernel}, k={k}; got {tuple(weight.shape)}")
    autocast = autocast_dtype(x.device.type) is not None
    if weight.dtype != x.dtype and not autocast:
        raise TypeError(f"shiftwise_conv: weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    _check_tables(pad_hv, idx_identit, r, nk)
    if impl == "reference":
        conv = F.conv2d(x, weight, padding=k - 1, groups=r)
        return _shift_add_reference(conv, pad_hv, idx_identit, big_kernel, k)
    if autocast:  # fold in the weight's precision, then cast like a conv under autocast
        with torch.autocast(x.device.type, enabled=False):
            kh, kv, ks = fold_shiftwise_weight(weight, pad_hv, idx_identit, big_kernel, k)
        x, kh, kv, ks = autocast_inputs(x, kh, kv, ks)
    else:
        kh, kv, ks = fold_shiftwise_weight(weight, pad_hv, idx_identit, big_kernel, k)
    if impl == "fast" or (impl == "auto" and not autoselect.measured_device(x)):
        return shiftwise_strips(x, kh, kv, ks, big_kernel, k)

    def fused(x_, kh_, kv_, ks_, fallback=""):  # fallback "": a kernel failure raises (timing, impl="triton")
        return _triton_modules()[1].fused_strips(x_, kh_, kv_, ks_, None, big_kernel, k, separate=True,
                                                 fallback=fallback)

    def strips(x_, kh_, kv_, ks_):
        return shiftwise_strips(x_, kh_, kv_, ks_, big_kernel, k)

    from lkvision.ops import kernels  # the package never imports triton

    tensors = (x, kh, kv, ks)
    train = needs_grad(*tensors)
    choice, fallback = autoselect.triton_choice(
        "shiftwise_conv", lambda: _sw_key(x, (kh, kv, ks), (big_kernel, k), train),
        lambda: kernels.can_run_shiftwise(x, kh, kv, ks, None, big_kernel, k, separate=True, needs_grad=train),
        {"triton": autoselect.candidate(fused, tensors, train), "fast": autoselect.candidate(strips, tensors, train)},
        "fast", impl, tensors)
    if choice != "triton":
        return strips(x, kh, kv, ks)
    return fused(x, kh, kv, ks, fallback)


@fx_leaf
def shiftwise_deploy_conv(x: Tensor, weight_h: Tensor, bias_h: Tensor | None, weight_v: Tensor,
                          bias_v: Tensor | None, padding_h, padding_v, *, impl: str = "auto") -> Tensor:
    """The deploy form of a Shiftwise layer: ``dwconv(x, weight_h, bias_h, padding_h) + dwconv(x, weight_v,
    bias_v, padding_v)`` (the small kernel and the identity live inside the horizontal strip).

    x (B, C, H, W); weight_h (C, 1, k, Lh), weight_v (C, 1, Lv, k); F.pad-style paddings that give an
    (H, W) output. ``impl``: "triton" = ONE fused Triton launch for both strips and the bias (x read once,
    y written once; :func:`lkvision.ops.kernels.triton_dwconv.dwconv2d_sum`); any :func:`dwconv2d` impl
    ("torch", "channels_last", "custom") = two depth-wise convs and an add (:func:`lkvision.ops.dwconv.dwconv2d_sum`:
    on CPU without autograd, oneDNN adds the second conv into the first one's output in place); "auto" = on CUDA
    with the kernels available, the faster of "triton" and two ``dwconv2d(impl="auto")`` calls, measured per
    problem by :mod:`lkvision.ops.autoselect` (default: the two convs where nothing may be measured); elsewhere
    the two convs with ``dwconv2d``'s own choice.
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"shiftwise_deploy_conv: impl must be one of {DWCONV_IMPLS}, got {impl!r}")
    x, weight_h, weight_v, bias_h, bias_v = autocast_inputs(x, weight_h, weight_v, bias_h, bias_v)

    def two_convs(x_, wh_, wv_, bh_, bv_):  # on CPU: one conv, then the second one added in place by oneDNN
        return dwconv2d_sum(x_, [wh_, wv_], [bh_, bv_], [padding_h, padding_v], impl=impl)

    if impl not in ("auto", "triton") or (impl == "auto" and not autoselect.measured_device(x)):
        return two_convs(x, weight_h, weight_v, bias_h, bias_v)
    pads = [normalize_padding(padding_h, tuple(weight_h.shape[-2:])),
            normalize_padding(padding_v, tuple(weight_v.shape[-2:]))]

    def fused(x_, wh_, wv_, bh_, bv_, fallback=""):  # fallback "": a kernel failure raises (timing, "triton")
        bias = bh_ if bv_ is None else bv_ if bh_ is None else bh_ + bv_
        return _triton_modules()[0].dwconv2d_sum(x_, [wh_, wv_], bias, pads, fallback=fallback)

    from lkvision.ops import kernels  # the package never imports triton

    args = (x, weight_h, weight_v, bias_h, bias_v)
    tensors = tuple(t for t in args if t is not None)
    train = needs_grad(x, weight_h, weight_v)  # also the key's training flag
    choice, fallback = autoselect.triton_choice(
        "shiftwise_deploy_conv",
        lambda: _sw_key(x, (weight_h, weight_v), (tuple(pads[0]), tuple(pads[1]), bias_h is not None), train),
        lambda: kernels.can_run_dwconv2d_sum(x, [weight_h, weight_v], bias_h if bias_h is not None else bias_v, pads,
                                             needs_grad=train),
        {"triton": autoselect.candidate(fused, args, train), "two_convs": autoselect.candidate(two_convs, args, train)},
        "two_convs", impl, tensors)
    if choice != "triton":  # impl is "auto" here: two dwconv2d calls with their own measured choice
        return two_convs(x, weight_h, weight_v, bias_h, bias_v)
    return fused(x, weight_h, weight_v, bias_h, bias_v, fallback)
