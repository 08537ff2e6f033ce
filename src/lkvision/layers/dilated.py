"""UniRepLKNet's Dilated Reparam Block: a large depth-wise conv plus parallel dilated small depth-wise convs.

Train form (channels C, kernel K)::

    y = BN_0(DWConv_KxK(x)) + sum_i BN_i(DWConv_{k_i x k_i, dilation r_i}(x))

with the branch table :data:`DILATED_BRANCHES` (the official code's table; the paper's table has a typo,
UniRepLKNet issue #4). A k x k kernel with dilation r is a dense kernel of size ``r(k-1)+1`` whose taps sit
at positions ``r*i`` (zeros elsewhere), so after folding every BN the whole sum is ONE biased K x K
depth-wise conv: :meth:`DilatedReparamConv.reparameterize` builds it exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import dwconv as _dwconv
from .conv_bn import ConvBN, pad_kernel_to

__all__ = ["DilatedReparamConv", "DILATED_BRANCHES", "dilated_to_dense", "dilated_branches_for"]

#: kernel size K -> ((k, r), ...): branch kernel size k and dilation r of each parallel branch.
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}


def dilated_branches_for(kernel_size: int) -> tuple[tuple[int, int], ...]:
    """The (kernel, dilation) pairs of the parallel branches for a main kernel of size ``kernel_size``."""
    if kernel_size not in DILATED_BRANCHES:
        raise ValueError(
            f"DilatedReparamConv supports kernel sizes {tuple(sorted(DILATED_BRANCHES))}, "
            f"got {kernel_size!r} (UniRepLKNet uses a plain depth-wise conv for 3 and 5)"
        )
    return DILATED_BRANCHES[kernel_size]


def dilated_to_dense(kernel: torch.Tensor, dilation: int | tuple[int, int]) -> torch.Tensor:
    """Dense equivalent of a dilated kernel.

    ``kernel``: (O, I, kh, kw) used with ``dilation`` r -> (O, I, r_h(kh-1)+1, r_w(kw-1)+1) holding the
    taps at rows ``r_h*i`` and columns ``r_w*j`` and zeros elsewhere. Exact for any ``groups`` (taps do
    not mix).
    """
    rh, rw = (dilation, dilation) if isinstance(dilation, int) else dilation
    if rh < 1 or rw < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    o, i, kh, kw = kernel.shape
    dense = kernel.new_zeros(o, i, rh * (kh - 1) + 1, rw * (kw - 1) + 1)
    dense[:, :, ::rh, ::rw] = kernel
    return dense


class DilatedReparamConv(nn.Module):
    """Dilated Reparam Block (UniRepLKNet, used for kernels >= 7 there).

    Args:
        channels: C (depth-wise: groups = C).
        kernel_size: K, one of ``DILATED_BRANCHES`` (5, 7, 9, 11, 13, 15, 17).
        sync_bn: use ``SyncBatchNorm``.
        deploy: build the merged form directly (one biased K x K depth-wise conv, no BN, no branches).

    Submodules (train form): ``main`` (:class:`ConvBN`, K x K depth-wise, run through
    ``lkvision.ops.dwconv2d``) and ``branches`` (one :class:`ConvBN` per (k, r), dilated, padding
    r(k-1)//2, plain ``nn.Conv2d`` forward). Deploy form: ``main.conv`` with bias, ``main.bn`` = Identity,
    ``branches`` empty.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, kernel_size: int, sync_bn: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.branch_specs = dilated_branches_for(kernel_size)
        self.main = ConvBN(channels, channels, kernel_size, groups=channels, sync_bn=sync_bn)
        self.branches = nn.ModuleList()
        if deploy:
            self.main.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                       groups=channels, bias=True)
            self.main.bn = nn.Identity()
        else:
            for k, r in self.branch_specs:
                self.branches.append(
                    ConvBN(channels, channels, k, padding=r * (k - 1) // 2, dilation=r, groups=channels,
                           sync_bn=sync_bn)
                )

    @property
    def is_merged(self) -> bool:
        return len(self.branches) == 0 and isinstance(self.main.bn, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.main.conv
        out = self.main.bn(_dwconv.dwconv2d(x, conv.weight, conv.bias, padding=self.kernel_size // 2))
        for branch in self.branches:  # BN(dilated depth-wise conv), the conv on the measured faster CPU path
            c = branch.conv
            out = out + branch.bn(_dwconv.dwconv2d_dilated(x, c.weight, c.bias, c.dilation[0]))
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel (C, 1, K, K), bias (C,)) of the single conv equal to this module in eval mode."""
        kernel, bias = self.main.fused_weight_bias()
        kernel, bias = kernel.clone(), bias.clone()
        size = (self.kernel_size, self.kernel_size)
        for branch in self.branches:
            w, b = branch.fused_weight_bias()
            kernel += pad_kernel_to(dilated_to_dense(w, branch.conv.dilation), size)
            bias += b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch and BN into ``main.conv`` (biased); exact in eval mode; idempotent."""
        if self.is_merged and self.main.conv.bias is not None:
            return
        kernel, bias = self.equivalent_kernel_bias()
        old = self.main.conv
        new = nn.Conv2d(self.channels, self.channels, self.kernel_size, padding=self.kernel_size // 2,
                        groups=self.channels, bias=True, device=kernel.device, dtype=kernel.dtype)
        new.weight.copy_(kernel)
        new.bias.copy_(bias)
        new.train(old.training)
        self.main.conv = new
        self.main.bn = nn.Identity()
        self.branches = nn.ModuleList()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, branches={self.branch_specs}"
