"""SLaK's decomposed large kernel: two depth-wise strips (M x N and N x M) plus an N x N kernel.

Train form (channels C, big kernel M, small kernel N; every branch a depth-wise conv + BN)::

    y = BN_v(DWConv_{M x N}(x)) + BN_h(DWConv_{N x M}(x)) + BN_s(DWConv_{N x N}(x))      (N x N only if N < M)

Padding is derived from each FILTER's shape, ``(kh//2, kw//2)``: (M//2, N//2) for the M x N strip and
(N//2, M//2) for the N x M strip. This is what the official iGEMM op computes; building the strips as
``nn.Conv2d(padding=M//2)`` is the known bug SLaK#15.

Re-parameterisation (the official code never merges; we do, exactly, in eval mode):

* default (``deploy_dense=False``): two biased strips, the N x N kernel embedded (zero-padded rows) into
  the M x N strip. Cost per pixel 2*M*N MACs, the cheapest exact form.
* ``deploy_dense=True`` (or ``reparameterize(dense=True)``): ONE dense L x L kernel, L = max(M, N).
  Cost M*M MACs per pixel: only worth it with a fast dense depth-wise kernel (MegEngine iGEMM). With the
  native PyTorch conv (CPU, or CUDA NCHW fp32) the dense form is much SLOWER than the strips (spec LK.md
  §3.3: SLaK-T 371 -> 174 img/s when merged to M x M on an A100 without iGEMM).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import dwconv as _dwconv
from .conv_bn import ConvBN, pad_kernel_to

__all__ = ["StripConv"]

_NO_SPLIT = "StripConv is already merged into a dense kernel; it cannot be split into strips"


def _check_kernel(name: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"StripConv: {name} must be a positive int, got {k!r}")
    if k % 2 == 0:
        raise ValueError(
            f"StripConv: {name}={k} is even; the kernels must be odd. With the official per-filter padding "
            "(kh//2, kw//2) an even size makes a branch output one row/column larger than the input, so the "
            "M x N and N x M branches cannot be summed"
        )
    return k


class StripConv(nn.Module):
    """Decomposed large depth-wise kernel (SLaK ``Decom=True``).

    Args:
        channels: C (depth-wise: groups = C).
        big_kernel: M, the strip length (odd).
        small_kernel: N, the strip width and the size of the square branch (odd). With N >= M the square
            branch is omitted (as in the official code); the strips are then M x N and N x M.
        bn: a BatchNorm after every branch (official default). Without BN the convs have no bias.
        sync_bn: use ``SyncBatchNorm``.
        deploy: build the merged form directly (see ``deploy_dense``).
        deploy_dense: the merged form is one dense L x L kernel (L = max(M, N)) instead of two biased strips.

    Submodules: ``strip_v`` (M x N, "vertical" strip: tall), ``strip_h`` (N x M, "horizontal": wide) and
    ``small`` (N x N or None), each a :class:`ConvBN` (``bn`` = Identity without BN). Two-strip deploy form:
    ``strip_v``/``strip_h`` with biased convs and Identity BN, ``small`` None. Dense deploy form: ``dense``
    (``nn.Conv2d`` L x L, biased), the strips None.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    #: marks a SLaK large-kernel layer for :mod:`lkvision.sparse` (duck typing, no import needed there)
    is_strip_conv = True

    def __init__(
        self,
        channels: int,
        big_kernel: int,
        small_kernel: int = 5,
        bn: bool = True,
        sync_bn: bool = False,
        deploy: bool = False,
        deploy_dense: bool = False,
    ) -> None:
        super().__init__()
        m = _check_kernel("big_kernel", big_kernel)
        n = _check_kernel("small_kernel", small_kernel)
        self.channels = channels
        self.big_kernel = m
        self.small_kernel = n
        self.deploy_dense = bool(deploy_dense)
        self.dense: nn.Conv2d | None = None
        self.strip_v: ConvBN | None = self._branch((m, n), bn, sync_bn)
        self.strip_h: ConvBN | None = self._branch((n, m), bn, sync_bn)
        self.small: ConvBN | None = self._branch((n, n), bn, sync_bn) if n < m else None
        if deploy:
            if self.deploy_dense:
                size = max(m, n)
                self.strip_v = self.strip_h = self.small = None
                self.dense = nn.Conv2d(channels, channels, size, padding=size // 2, groups=channels,
                                       bias=True)
            else:
                self.small = None
                for branch in (self.strip_v, self.strip_h):
                    c = branch.conv
                    branch.conv = nn.Conv2d(channels, channels, c.kernel_size, padding=c.padding,
                                            groups=channels, bias=True)
                    branch.bn = nn.Identity()

    def _branch(self, size: tuple[int, int], bn: bool, sync_bn: bool) -> ConvBN:
        branch = ConvBN(self.channels, self.channels, size, groups=self.channels, sync_bn=sync_bn)
        if not bn:
            branch.bn = nn.Identity()
        return branch

    @property
    def sparse_weight_names(self) -> list[str]:
        """Weights that SLaK's ``--only-L`` sparse training masks: the two strips (the official name filter
        ``large_kernel.LoRA``; the N x N kernel stays dense), or the dense kernel once merged."""
        if self.dense is not None:
            return ["dense.weight"]
        return ["strip_v.conv.weight", "strip_h.conv.weight"]

    @property
    def merged_size(self) -> int:
        """Side L of the dense equivalent kernel."""
        return max(self.big_kernel, self.small_kernel)

    @staticmethod
    def _run(branch: ConvBN, x: torch.Tensor) -> torch.Tensor:
        c = branch.conv
        kh, kw = c.weight.shape[-2:]
        return branch.bn(_dwconv.dwconv2d(x, c.weight, c.bias, padding=(kh // 2, kw // 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return _dwconv.dwconv2d(x, self.dense.weight, self.dense.bias, padding="same")
        if self.small is None and isinstance(self.strip_v.bn, nn.Identity) and isinstance(self.strip_h.bn, nn.Identity):
            # two-strip deploy form: one op (on CPU without autograd, the second strip is added in place)
            convs = (self.strip_v.conv, self.strip_h.conv)
            return _dwconv.dwconv2d_sum(x, [c.weight for c in convs], [c.bias for c in convs],
                                        [(c.weight.shape[-2] // 2, c.weight.shape[-1] // 2) for c in convs])
        out = self._run(self.strip_v, x) + self._run(self.strip_h, x)
        if self.small is not None:
            out = out + self._run(self.small, x)
        return out

    # ------------------------------------------------------------------------------------ re-param
    @torch.no_grad()
    def strip_kernels_bias(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact two-strip form: (W_v (C,1,M,N), b_v, W_h (C,1,N,M), b_h), the N x N branch inside W_v."""
        if self.dense is not None:
            raise RuntimeError(_NO_SPLIT)
        wv, bv = (t.clone() for t in self.strip_v.fused_weight_bias())
        wh, bh = (t.clone() for t in self.strip_h.fused_weight_bias())
        if self.small is not None:
            ws, bs = self.small.fused_weight_bias()
            wv += pad_kernel_to(ws, tuple(wv.shape[-2:]))
            bv += bs
        return wv, bv, wh, bh

    @torch.no_grad()
    def dense_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact dense form: (W (C, 1, L, L), b (C,)), L = max(M, N)."""
        if self.dense is not None:
            return self.dense.weight.detach().clone(), self.dense.bias.detach().clone()
        wv, bv, wh, bh = self.strip_kernels_bias()
        size = (self.merged_size, self.merged_size)
        return pad_kernel_to(wv, size) + pad_kernel_to(wh, size), bv + bh

    def _new_conv(self, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
        kh, kw = weight.shape[-2:]
        conv = nn.Conv2d(self.channels, self.channels, (kh, kw), padding=(kh // 2, kw // 2),
                         groups=self.channels, bias=True, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv

    @torch.no_grad()
    def reparameterize(self, dense: bool | None = None) -> None:
        """Merge in place (exact in eval mode, idempotent).

        ``dense``: None -> ``self.deploy_dense``; False -> two biased strips; True -> one dense L x L kernel.
        A dense module cannot be split back into strips (ValueError).
        """
        dense = self.deploy_dense if dense is None else bool(dense)
        if self.dense is not None:
            if not dense:
                raise ValueError(_NO_SPLIT)
            return
        training = self.strip_v.conv.training
        if dense:
            w, b = self.dense_kernel_bias()
            self.dense = self._new_conv(w, b).train(training)
            self.strip_v = self.strip_h = self.small = None
            self.deploy_dense = True
            return
        if self.small is None and all(
            isinstance(br.bn, nn.Identity) and br.conv.bias is not None for br in (self.strip_v, self.strip_h)
        ):
            return  # already the two-strip form
        wv, bv, wh, bh = self.strip_kernels_bias()
        for branch, w, b in ((self.strip_v, wv, bv), (self.strip_h, wh, bh)):
            branch.conv = self._new_conv(w, b).train(training)
            branch.bn = nn.Identity()
        self.small = None

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, big_kernel={self.big_kernel}, small_kernel={self.small_kernel}, "
                f"deploy_dense={self.deploy_dense}")
