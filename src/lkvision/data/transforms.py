"""Image transforms, Mixup/CutMix and the matching loss -- all from timm/torchvision (nothing re-written).

Training (ImageNet recipe, SW.md §5): ``RandomResizedCrop`` (bicubic) + horizontal flip + RandAugment
``rand-m9-mstd0.5-inc1`` + ``RandomErasing`` (p 0.25, pixel mode); evaluation: resize to
``input_size / crop_pct`` then center crop. Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 and
soft-target cross-entropy.
"""

from __future__ import annotations

from torch import nn

from ._compat import ensure_torchvision

__all__ = ["build_transform", "build_mixup", "build_train_loss", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(cfg, is_training: bool):
    """timm ``create_transform`` for PIL images, configured from a TrainConfig-like ``cfg``."""
    ensure_torchvision()
    from timm.data import create_transform

    if is_training:
        return create_transform(
            cfg.input_size, is_training=True, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa or None, interpolation=cfg.interpolation, mean=tuple(cfg.mean),
            std=tuple(cfg.std), re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
            scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
        )
    return create_transform(
        cfg.input_size, is_training=False, interpolation=cfg.interpolation, mean=tuple(cfg.mean),
        std=tuple(cfg.std), crop_pct=cfg.crop_pct,
    )


def build_mixup(cfg, num_classes: int):
    """timm ``Mixup`` (per batch; it also applies label smoothing) or ``None`` when both alphas are 0."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0) or cfg.mixup_prob <= 0:
        return None
    ensure_torchvision()
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def build_train_loss(cfg, mixup_active: bool) -> nn.Module:
    """Soft-target CE with mixup (targets already smoothed), else label-smoothing CE, else plain CE."""
    if mixup_active:
        ensure_torchvision()
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()
