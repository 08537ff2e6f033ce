"""Re-parameterisable depth-wise convolutions (RepLKNet, Guideline 3) and conv-BN-activation blocks.

* :class:`ReparamLargeKernelConv`: a large depth-wise conv + BN with an optional parallel small depth-wise
  conv + BN; :meth:`~ReparamLargeKernelConv.reparameterize` merges both into one biased large conv, exactly.
* :class:`DepthwiseConv2d`: an ``nn.Conv2d`` (groups = channels) whose forward runs through
  :func:`lkvision.ops.dwconv2d` so that the fastest depth-wise path is used.
* :class:`ConvBNAct`: ``act(BN(conv(x)))`` whose BN folds into the conv on ``reparameterize()``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dwconv as _dwconv
from ..ops._fx import fx_traces_as
from ..ops.dwconv_fft import MIN_FFT_TAPS
from ..ops.kernels._common import autocast_dtype
from ..ops.linear import fast_cpu_path_ok
from .conv_bn import ConvBN, fuse_bn, pad_kernel_to

__all__ = [
    "ReparamLargeKernelConv", "DepthwiseConv2d", "ConvBNAct", "depthwise_conv", "fold_bn_into_next_conv1x1",
    "conv_act", "conv_act_reference",
]


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair (kh, kw), got {v!r}")
    return t  # type: ignore[return-value]


def depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Depth-wise conv (B, C, H, W) x (C, 1, kh, kw) -> (B, C, H', W').

    Stride-1 convs go through :func:`lkvision.ops.dwconv2d` (path chosen by measurement); strided ones use
    ``F.conv2d`` (the fast paths are stride-1 only).
    """
    if tuple(stride) == (1, 1):
        return _dwconv.dwconv2d(x, weight, bias, padding=padding)
    return F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=weight.shape[0])


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, k, groups=C)`` with "same" padding ``(kh//2, kw//2)`` run through ``dwconv2d``.

    Parameters keep the standard layout: ``weight`` (C, 1, kh, kw), optional ``bias`` (C,).
    Shapes: (B, C, H, W) -> (B, C, H', W') with H' = H for odd kh and stride 1.
    """

    def __init__(self, channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 bias: bool = True) -> None:
        ks = _pair(kernel_size)
        super().__init__(channels, channels, ks, stride=stride, padding=(ks[0] // 2, ks[1] // 2),
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv(x, self.weight, self.bias, self.padding, self.stride)


def conv_act_reference(x: torch.Tensor, conv: nn.Conv2d, act: nn.Module) -> torch.Tensor:
    """``act(conv(x))``: the conv's output, then the activation as a separate pass (the official code)."""
    return act(conv(x))


def _post_op(act: nn.Module) -> tuple[str, list[float], str] | None:
    """oneDNN's post-op ``(attr, scalars, algorithm)`` for the activation module, or None where it has none."""
    if type(act) is nn.ReLU:
        return "relu", [], ""
    if type(act) is nn.ReLU6:
        return "hardtanh", [0.0, 6.0], ""
    if type(act) is nn.GELU and act.approximate in ("none", "tanh"):
        return "gelu", [], act.approximate
    return None


@functools.cache
def onednn_conv_act_available(dtype: torch.dtype) -> bool:
    """True when oneDNN's conv with a fused activation (``mkldnn::_convolution_pointwise``) runs here for
    ``dtype`` and equals conv + ReLU (probed once on a tiny problem)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = (torch.arange(2 * 4 * 5 * 5, dtype=dtype).reshape(2, 4, 5, 5) / 50 - 1).contiguous(
            memory_format=torch.channels_last)
        w = torch.ones(4, 2, 3, 3, dtype=dtype) / 9
        b = torch.full((4,), -0.25, dtype=dtype)
        got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 2, "relu", [], "")
        want = F.relu(F.conv2d(x, w, b, padding=1, groups=2))
        return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2))
    except Exception:  # noqa: BLE001 - any failure (missing op, unsupported ISA) means: use the reference
        return False


def _fused_conv_act_ok(x: torch.Tensor, conv: nn.Conv2d, act: nn.Module) -> bool:
    """Where :func:`conv_act` runs the conv and the activation as one oneDNN call: an eager CPU call that records
    no graph, no autocast, one floating dtype, zero padding; not a stride-1 depth-wise conv that
    :func:`lkvision.ops.dwconv2d` may run better (a kernel large enough for its measured FFT choice, or a width it
    widens for this CPU)."""
    w, b = conv.weight, conv.bias
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    if (_post_op(act) is None or x.dim() != 4 or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or x.dtype != w.dtype or (b is not None and b.dtype != x.dtype) or x.shape[1] != conv.in_channels):
        return False
    depthwise_s1 = conv.groups == conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
    if depthwise_s1 and (w.shape[-2] * w.shape[-1] >= MIN_FFT_TAPS or w.shape[-1] in _dwconv._cpu_widen_table()):
        return False
    return (fast_cpu_path_ok(x, w, b) and autocast_dtype("cpu") is None and onednn_conv_act_available(x.dtype))


@fx_traces_as(conv_act_reference)
def conv_act(x: torch.Tensor, conv: nn.Conv2d, act: nn.Module) -> torch.Tensor:
    """:func:`conv_act_reference` with the activation fused into oneDNN's conv (a post-op) for inference on CPU
    (ReLU, ReLU6, GELU): no separate pass over the output and no second full-size buffer. RepLKNet's stem runs
    a 3x3 depth-wise conv + ReLU on (4, 128, 112, 112): 46 ms as conv + ``F.relu`` (most of it first-touch page
    faults of the ReLU's fresh 25 MB output), 6.5 ms fused (AMD Zen 3, one thread). Elsewhere (training,
    autocast, other activations, large stride-1 depth-wise kernels): the conv as :class:`ConvBNAct` runs it, then
    the activation. x (B, C_in, H, W) -> (B, C_out, H', W'), the layout of ``x``."""
    if _fused_conv_act_ok(x, conv, act):
        attr, scalars, algorithm = _post_op(act)
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       attr, scalars, algorithm)
    if _runs_as_depthwise(conv):
        return act(depthwise_conv(x, conv.weight, conv.bias, conv.padding, conv.stride))
    return act(conv(x))


def _runs_as_depthwise(conv: nn.Conv2d) -> bool:
    """A conv that :func:`depthwise_conv` computes: depth-wise (groups = in = out > 1), undilated, zero padding."""
    return (conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")


class ConvBNAct(ConvBN):
    """``act(BN(conv(x)))``; keys ``conv.*`` and ``bn.*`` as :class:`~lkvision.layers.ConvBN`.

    ``act``: an activation module (ReLU, ReLU6, GELU, ...) or ``None`` for identity. Depth-wise convs
    (``groups == in == out``) with stride 1 run through :func:`lkvision.ops.dwconv2d`.
    ``reparameterize()`` folds the BN into a biased conv (exact in eval mode).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, groups: int = 1, act: nn.Module | None = None,
                 sync_bn: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, sync_bn=sync_bn)
        self.act = act if act is not None else nn.Identity()
        self._depthwise = _runs_as_depthwise(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if isinstance(self.bn, nn.Identity) and c.kernel_size != (1, 1):  # deploy form: the activation fused
            return conv_act(x, c, self.act)
        if self._depthwise:
            return self.act(self.bn(depthwise_conv(x, c.weight, c.bias, c.padding, c.stride)))
        return self.forward_fused(x, self.act)  # 1x1 convs: one fused GEMM (+ activation) once deployed


class ReparamLargeKernelConv(nn.Module):
    """Large depth-wise conv + BN, plus an optional parallel small depth-wise conv + BN (summed).

    ``y = BN_L(DWConv_K(x)) + BN_S(DWConv_k(x))``, both with "same" padding (K//2, k//2) and the same stride.
    :meth:`reparameterize` replaces both branches by one biased depth-wise K conv (``self.conv``) by fusing
    each BN into its kernel and zero-padding the small kernel centrally (RepLKNet Guideline 3); this is
    exact because both branches are centred. Without a small branch the large branch's BN is still folded.

    Args:
        channels: C (input = output channels; groups = C).
        kernel_size: K, an int or ``(kh, kw)`` (rectangular kernels are allowed).
        small_kernel: ``None`` (no small branch), an int, or ``(sh, sw)``. ``K - k`` must be even and
            non-negative per axis.
        sync_bn: use ``SyncBatchNorm`` for both BNs.
        stride: stride of both branches (1 in RepLKNet; 2 for MobileNetV2's down-sampling DW convs).
        bn: a BN after each branch (default). ``bn=False`` (SLaK's ``bn=False``): bias-free convs only,
            ``y = DWConv_K(x) + DWConv_k(x)``; ``large.bn``/``small.bn`` are ``nn.Identity``.

    Shapes: (B, C, H, W) -> (B, C, H', W'), H' = floor((H + 2*(kh//2) - kh) / stride) + 1.
    """

    def __init__(self, channels: int, kernel_size: int | tuple[int, int],
                 small_kernel: int | tuple[int, int] | None = None, sync_bn: bool = False,
                 stride: int = 1, bn: bool = True) -> None:
        super().__init__()
        ks = _pair(kernel_size)
        if min(ks) < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        sk = None if small_kernel is None else _pair(small_kernel)
        if sk is not None:
            dh, dw = ks[0] - sk[0], ks[1] - sk[1]
            if min(sk) < 1 or dh < 0 or dw < 0 or dh % 2 or dw % 2:
                raise ValueError(
                    f"small_kernel {sk[0]}x{sk[1]} cannot be merged into kernel_size {ks[0]}x{ks[1]}: "
                    "it must be positive, no larger than the large kernel, and the difference K - k must be "
                    "even along each axis (so that the small kernel is centred)"
                )
        self.channels = channels
        self.kernel_size = ks
        self.small_kernel = sk
        self.stride = (stride, stride)
        self.padding = (ks[0] // 2, ks[1] // 2)
        # padding K//2 per axis (the official / iGEMM convention; "same" for odd K, H+1 for even K)
        self.large: ConvBN | None = ConvBN(channels, channels, ks, stride=stride, padding=self.padding,
                                           groups=channels, sync_bn=sync_bn)
        self.small: ConvBN | None = None
        if sk is not None:
            self.small = ConvBN(channels, channels, sk, stride=stride, padding=(sk[0] // 2, sk[1] // 2),
                                groups=channels, sync_bn=sync_bn)
        if not bn:
            for branch in (self.large, self.small):
                if branch is not None:
                    branch.bn = nn.Identity()
        self.conv: nn.Conv2d | None = None  # the merged (deploy) conv

    @property
    def is_merged(self) -> bool:
        return self.conv is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return depthwise_conv(x, self.conv.weight, self.conv.bias, self.padding, self.stride)
        lc = self.large.conv
        y = self.large.bn(depthwise_conv(x, lc.weight, lc.bias, lc.padding, self.stride))
        if self.small is not None:
            sc = self.small.conv
            y = y + self.small.bn(depthwise_conv(x, sc.weight, sc.bias, sc.padding, self.stride))
        return y

    @torch.no_grad()
    def merged_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel (C, 1, kh, kw) and bias (C,) of the equivalent single conv (no module change)."""
        if self.conv is not None:
            return self.conv.weight.detach(), self.conv.bias.detach()
        w, b = self.large.fused_weight_bias()
        if self.small is not None:
            ws, bs = self.small.fused_weight_bias()
            w = w + pad_kernel_to(ws, self.kernel_size)
            b = b + bs
        return w, b

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge into one biased depth-wise conv in place (idempotent; exact in eval mode)."""
        if self.conv is not None:
            return
        w, b = self.merged_weight_bias()
        conv = nn.Conv2d(self.channels, self.channels, self.kernel_size, self.stride, self.padding,
                         groups=self.channels, bias=True, device=w.device, dtype=w.dtype)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        self.conv = conv
        self.large = None
        self.small = None

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        return s + (", merged" if self.conv is not None else "")


@torch.no_grad()
def fold_bn_into_next_conv1x1(bn: nn.modules.batchnorm._BatchNorm, conv: nn.Conv2d) -> nn.Conv2d:
    """Fold an eval-mode BN that *precedes* a 1x1, stride-1, ungrouped, unpadded conv into that conv.

    ``conv(BN(x)) = conv'(x)`` with ``W'[o, i] = W[o, i] * s_i`` and
    ``b'[o] = b[o] + sum_i W[o, i] * (beta_i - mu_i * s_i)``, ``s = gamma / sqrt(var + eps)``. Exact only
    because a 1x1 conv has no zero padding (a padded K>1 conv would see un-normalised zeros at the border).
    Returns a new biased ``nn.Conv2d``.
    """
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
        raise ValueError(
            f"a preceding BN folds exactly only into an ungrouped, unpadded 1x1 conv; got kernel "
            f"{conv.kernel_size}, padding {conv.padding}, groups {conv.groups}"
        )
    # The BN as a per-channel affine map y = s * x + t; fuse_bn on an identity kernel gives (s, t).
    s, t = fuse_bn(torch.ones(bn.num_features, 1, 1, 1, device=conv.weight.device, dtype=conv.weight.dtype), bn)
    s = s.reshape(-1)
    w = conv.weight
    b = conv.bias if conv.bias is not None else w.new_zeros(conv.out_channels)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=True,
                    device=w.device, dtype=w.dtype)
    new.weight.copy_(w * s.reshape(1, -1, 1, 1))
    new.bias.copy_(b + w.flatten(1) @ t)
    return new
