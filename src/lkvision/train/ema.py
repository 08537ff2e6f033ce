"""Exponential moving average of model weights (float buffers are copied, not averaged)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .distributed import unwrap_model as _unwrap

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    ``warmup=True`` uses ``min(decay, (1 + n) / (10 + n))`` for the n-th update so that early averages are
    not dominated by the random init. Kept on ``device`` (default: the model's). Integer buffers (BN
    ``num_batches_tracked``) and non-float tensors are copied. ``state_dict`` is the averaged model's plus
    ``updates`` in the checkpoint's extra state.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = _unwrap(model).state_dict()
        for k, v in self.module.state_dict().items():
            s = src[k].detach().to(v.device)
            if v.is_floating_point():
                v.mul_(d).add_(s.to(v.dtype), alpha=1.0 - d)
            else:
                v.copy_(s)
        self.updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
