"""The tiny registered test model and the quick-run config shared by the training tests."""

from __future__ import annotations

import os

from safetensors.torch import load_file
from torch import nn

from lkvision.layers import DropPath, LayerNorm2d
from lkvision.models import LargeKernelNet, list_models, register_model
from lkvision.train import make_config

TINY = "lkv_test_tiny_train"
TINY_WIDE = "lkv_test_tiny_train_wide"


# --------------------------------------------------------------------------------------- a tiny test model
class _Block(nn.Module):
    """x + DropPath(pw2(GELU(pw1(LN(dw7x7(x)))))): (B, C, H, W) -> (B, C, H, W). No BatchNorm."""

    def __init__(self, dim: int, kernel: int, drop_path: float) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, 2 * dim, 1)
        self.pw2 = nn.Conv2d(2 * dim, dim, 1)
        self.drop = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop(self.pw2(nn.functional.gelu(self.pw1(self.norm(self.dw(x))))))


class TinyTrainNet(LargeKernelNet):
    """Stride-4 stem, two 7x7-DW stages (strides 4, 8), mean-pool head. (B, in_chans, H, W) -> (B, classes)."""

    min_input_size = 8

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_path_rate: float = 0.0, dim: int = 24):
        super().__init__()
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, 2 * dim
        self.stem = nn.Conv2d(in_chans, dim, 4, 4)
        self.stage0 = nn.Sequential(_Block(dim, 7, 0.0))
        self.down = nn.Conv2d(dim, 2 * dim, 2, 2)
        self.stage1 = nn.Sequential(_Block(2 * dim, 7, drop_path_rate))
        self.head = nn.Linear(2 * dim, num_classes)
        self.feature_info = [dict(num_chs=dim, reduction=4, module="stage0"),
                             dict(num_chs=2 * dim, reduction=8, module="stage1")]
        self._init_features_mode(False, None)

    def stage_pairs(self):
        return [(self.stem, self.stage0), (self.down, self.stage1)]

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)


if TINY not in list_models(TINY):
    @register_model
    def lkv_test_tiny_train(pretrained: bool = False, **kwargs) -> TinyTrainNet:
        return TinyTrainNet(**kwargs)

    @register_model
    def lkv_test_tiny_train_wide(pretrained: bool = False, **kwargs) -> TinyTrainNet:
        return TinyTrainNet(dim=32, **kwargs)


def quick_cfg(out, **kw):
    base = dict(model=TINY, output=str(out), input_size=32, bundled_distractors=1, train_subset=256,
                val_subset=200, batch_size=32, epochs=2, lr=4e-3, warmup_epochs=0.5, workers=0,
                progress=False, plot=False, reparam_check=False, threads=1, log_every=0)
    base.update(kw)
    return make_config("default", base)


def weights_of(path):
    return load_file(str(path))


# ------------------------------------------------------------------- a model that sends itself a signal
#: {forward number (1-based, training mode only): [signals]}: what TinySignalNet sends to its own process
SIGNAL_PLAN: dict[int, list[int]] = {}
_FORWARDS = [0]


class TinySignalNet(TinyTrainNet):
    """TinyTrainNet whose forward sends the planned signals: a Ctrl-C in the middle of a training step."""

    def forward(self, x):
        if self.training and SIGNAL_PLAN:
            _FORWARDS[0] += 1
            for sig in SIGNAL_PLAN.get(_FORWARDS[0], []):
                os.kill(os.getpid(), sig)
        return super().forward(x)


TINY_SIGNAL = "lkv_test_tiny_signal"
if TINY_SIGNAL not in list_models(TINY_SIGNAL):
    @register_model
    def lkv_test_tiny_signal(pretrained: bool = False, **kwargs) -> TinySignalNet:
        return TinySignalNet(**kwargs)


def plan_signals(plan: dict[int, list[int]] | None) -> None:
    """Send ``plan[n]`` at the n-th training forward from now on (``None``: send nothing)."""
    SIGNAL_PLAN.clear()
    SIGNAL_PLAN.update(plan or {})
    _FORWARDS[0] = 0
