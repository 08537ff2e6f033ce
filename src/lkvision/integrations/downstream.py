"""A downstream task that runs on a CPU: UperNet (mmseg) or Mask R-CNN (mmdet) on the bundled dense digits.

:func:`seg_config` / :func:`det_config` give complete mmengine configs (no ``_base_``, everything visible) for
an lkvision backbone on :mod:`lkvision.data.dense`; :func:`run_downstream` trains one with mmengine's Runner,
evaluates with the frameworks' own metrics (mmseg ``IoUMetric``; mmdet ``CocoMetric``, i.e. pycocotools), writes
prediction overlays and returns a result row. The heads are slimmed (64 channels) so that a run takes minutes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..data.bundled import BUNDLED_MEAN, BUNDLED_STD
from ..data.dense import DIGIT_CLASSES, SEG_CLASSES
from ..fileio import atomic_path
from .backbone import build_backbone, feature_channels

__all__ = ["seg_config", "det_config", "run_downstream", "PALETTE"]

# one colour per digit class (background black), used by the frameworks' visualisers and by the overlays
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
# digit strokes are ~3 % of the pixels: without re-weighting "all background" is a strong local optimum
SEG_CLASS_WEIGHT = [0.1] + [1.0] * len(DIGIT_CLASSES)
_MEAN = [BUNDLED_MEAN[0] * 255.0] * 3
_STD = [BUNDLED_STD[0] * 255.0] * 3


def _backbone_channels(model_name: str, model_kwargs: dict | None) -> list[int]:
    """Channels of the 4 outputs of the backbone, read from a copy built on the meta device (no weights are
    allocated or initialised; the runner builds the real one)."""
    with torch.device("meta"):
        return feature_channels(build_backbone(model_name, **(model_kwargs or {})))


def _common(root: str, work_dir: str, iters: int, lr: float, batch_size: int, seed: int, scope: str,
            val_evaluator: dict, train_dataset: dict, val_dataset: dict, model: dict) -> dict:
    return dict(
        default_scope=scope,
        custom_imports=dict(imports=[f"lkvision.integrations.{scope}"], allow_failed_imports=False),
        model=model,
        work_dir=work_dir,
        train_dataloader=dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                              sampler=dict(type="InfiniteSampler", shuffle=True), dataset=train_dataset),
        val_dataloader=dict(batch_size=8, num_workers=0, persistent_workers=False,
                            sampler=dict(type="DefaultSampler", shuffle=False), dataset=val_dataset),
        val_evaluator=val_evaluator,
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=lr, betas=(0.9, 0.999),
                                                               weight_decay=0.05),
                           clip_grad=dict(max_norm=5.0)),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=max(1, iters // 10)),
            dict(type="CosineAnnealingLR", T_max=iters - max(1, iters // 10), eta_min=lr * 0.01, by_epoch=False,
                 begin=max(1, iters // 10), end=iters),
        ],
        default_hooks=dict(timer=dict(type="IterTimerHook"),
                           logger=dict(type="LoggerHook", interval=max(1, iters // 10), log_metric_by_epoch=False),
                           param_scheduler=dict(type="ParamSchedulerHook"), checkpoint=None,
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        randomness=dict(seed=seed, deterministic=False),
        log_level="WARNING",
        launcher="none",
    )


def seg_config(model_name: str, root: str, work_dir: str, iters: int = 400, lr: float = 1e-3,
               batch_size: int = 8, seed: int = 0, model_kwargs: dict | None = None, canvas: int = 64) -> dict:
    """mmseg config: ``model_name`` + UperNet (64 channels) on ``root`` (written by ``write_dense_digits``)."""
    chs = _backbone_channels(model_name, model_kwargs)
    norm = dict(type="BN", requires_grad=True)
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=_MEAN, std=_STD, bgr_to_rgb=False, pad_val=0,
                               seg_pad_val=255, size=(canvas, canvas)),
        backbone=dict(type="LKVisionBackbone", model_name=model_name, out_indices=(0, 1, 2, 3),
                      model_kwargs=dict(model_kwargs or {})),
        decode_head=dict(type="UPerHead", in_channels=chs, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=64, dropout_ratio=0.1, num_classes=len(SEG_CLASSES), norm_cfg=norm,
                         align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0,
                                          class_weight=SEG_CLASS_WEIGHT)),
        train_cfg=dict(), test_cfg=dict(mode="whole"),
    )
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
                dict(type="PackSegInputs")]

    def dataset(split: str) -> dict:
        return dict(type="BaseSegDataset", data_root=root, img_suffix=".png", seg_map_suffix=".png",
                    reduce_zero_label=False, metainfo=dict(classes=SEG_CLASSES, palette=PALETTE),
                    data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"),
                    pipeline=pipeline)

    return _common(root, work_dir, iters, lr, batch_size, seed, "mmseg",
                   dict(type="IoUMetric", iou_metrics=["mIoU"]), dataset("train"), dataset("val"), model)


def det_config(model_name: str, root: str, work_dir: str, iters: int = 400, lr: float = 1e-3,
               batch_size: int = 8, seed: int = 0, model_kwargs: dict | None = None, canvas: int = 64) -> dict:
    """mmdet config: ``model_name`` + Mask R-CNN (FPN, 64 channels) on ``root``."""
    chs = _backbone_channels(model_name, model_kwargs)
    width, classes = 64, len(DIGIT_CLASSES)
    extractor = dict(type="SingleRoIExtractor", out_channels=width, featmap_strides=[4, 8, 16, 32])
    model = dict(
        type="MaskRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=_MEAN, std=_STD, bgr_to_rgb=False, pad_mask=True,
                               pad_size_divisor=32),
        backbone=dict(type="LKVisionBackbone", model_name=model_name, out_indices=(0, 1, 2, 3),
                      model_kwargs=dict(model_kwargs or {})),
        neck=dict(type="FPN", in_channels=chs, out_channels=width, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=width, feat_channels=width,
            anchor_generator=dict(type="AnchorGenerator", scales=[4], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(**extractor, roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0)),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=width, fc_out_channels=256, roi_feat_size=7,
                num_classes=classes,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
            mask_roi_extractor=dict(**extractor, roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0)),
            mask_head=dict(type="FCNMaskHead", num_convs=2, in_channels=width, conv_out_channels=width,
                           num_classes=classes,
                           loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=128, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=1000, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                    match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=500, max_per_img=100, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=20,
                      mask_thr_binary=0.5)),
    )

    def dataset(split: str, train: bool) -> dict:
        # the no-op Resize records scale_factor, which mmdet's post-processing needs
        pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                    dict(type="Resize", scale=(canvas, canvas), keep_ratio=True), dict(type="PackDetInputs")]
        return dict(type="CocoDataset", data_root=root, ann_file=f"annotations/instances_{split}.json",
                    data_prefix=dict(img=f"img_dir/{split}/"), metainfo=dict(classes=DIGIT_CLASSES,
                                                                             palette=PALETTE[1:]),
                    filter_cfg=dict(filter_empty_gt=train, min_size=0), pipeline=pipeline, test_mode=not train)

    evaluator = dict(type="CocoMetric", ann_file=f"{root}/annotations/instances_val.json", metric=["bbox", "segm"],
                     format_only=False)
    return _common(root, work_dir, iters, lr, batch_size, seed, "mmdet", evaluator, dataset("train", True),
                   dataset("val", False), model)


def _loss_history(runner) -> list[float]:
    buf = runner.message_hub.get_scalar("train/loss")
    return [float(v) for v in buf.data[0]]


def _grey_rgb(img_path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float32)


def _colour_labels(label_map: np.ndarray) -> np.ndarray:
    pal = np.asarray(PALETTE, np.float32)
    return pal[np.clip(label_map, 0, len(PALETTE) - 1)]


def _overlay_seg(sample) -> np.ndarray:
    img = _grey_rgb(sample.img_path)
    pred = sample.pred_sem_seg.data[0].cpu().numpy()
    gt = sample.gt_sem_seg.data[0].cpu().numpy()
    blend = lambda lab: np.where((lab > 0)[..., None], 0.4 * img + 0.6 * _colour_labels(lab), img)  # noqa: E731
    return np.concatenate([img, blend(gt), blend(pred)], axis=1)


def _overlay_det(sample, score_thr: float = 0.3) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = _grey_rgb(sample.img_path)
    inst = sample.pred_instances
    keep = (inst.scores >= score_thr).cpu().numpy()
    out = img.copy()
    masks = inst.masks.cpu().numpy()[keep] if "masks" in inst else []
    labels = inst.labels.cpu().numpy()[keep]
    for m, lab in zip(masks, labels):
        out[m] = 0.4 * out[m] + 0.6 * np.asarray(PALETTE[int(lab) + 1], np.float32)
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for (x0, y0, x1, y1), lab, score in zip(inst.bboxes.cpu().numpy()[keep], labels, inst.scores.cpu().numpy()[keep]):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=PALETTE[int(lab) + 1])
        draw.text((x0 + 1, max(0.0, y0 - 10)), f"{DIGIT_CLASSES[int(lab)]} {score:.2f}", fill=(255, 255, 255))
    return np.concatenate([img, np.asarray(pil, np.float32)], axis=1)


def write_overlays(runner, task: str, path: Path, count: int = 8) -> Path:
    """Predict the first ``count`` val images and write one PNG: per row the input, (seg: ground truth,)
    prediction. Digits are coloured by class (:data:`PALETTE`)."""
    from PIL import Image

    model = runner.model
    model.eval()
    rows = []
    with torch.no_grad():
        for batch in runner.val_dataloader:
            for sample in model.test_step(batch):
                rows.append(_overlay_seg(sample) if task == "seg" else _overlay_det(sample))
                if len(rows) == count:
                    break
            if len(rows) == count:
                break
    grid = np.concatenate(rows, axis=0).clip(0, 255).astype(np.uint8)
    scale = max(1, 384 // grid.shape[1])
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def run_downstream(task: str, model_name: str, root: str, work_dir: str, iters: int = 400, lr: float = 1e-3,
                   batch_size: int = 8, seed: int = 0, model_kwargs: dict | None = None, canvas: int = 64,
                   overlays: int = 8) -> dict:
    """Train and evaluate one model; returns a result row (metrics, loss curve ends, times, parameter count)."""
    if task not in ("seg", "det"):
        raise ValueError(f"task must be 'seg' or 'det', got {task!r}")
    import importlib

    from mmengine.config import Config
    from mmengine.runner import Runner

    importlib.import_module(f"lkvision.integrations.{'mmseg' if task == 'seg' else 'mmdet'}")  # registrations
    make = seg_config if task == "seg" else det_config
    cfg = Config(make(model_name, root, work_dir, iters=iters, lr=lr, batch_size=batch_size, seed=seed,
                      model_kwargs=model_kwargs, canvas=canvas))
    runner = Runner.from_cfg(cfg)
    t0 = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - t0
    losses = _loss_history(runner)
    t0 = time.perf_counter()
    metrics = runner.val_loop.run()
    eval_s = time.perf_counter() - t0
    backbone = runner.model.backbone
    row = dict(task=task, model=model_name, model_kwargs=dict(model_kwargs or {}), seed=seed, iters=iters,
               backbone_params=sum(p.numel() for p in backbone.parameters()),
               params=sum(p.numel() for p in runner.model.parameters()),
               loss_first=float(np.mean(losses[: max(1, len(losses) // 10)])),
               loss_last=float(np.mean(losses[-max(1, len(losses) // 10):])),
               train_s=round(train_s, 1), eval_s=round(eval_s, 1),
               metrics={k: (float(v) if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) else v)
                        for k, v in metrics.items()})
    if overlays:
        row["overlays"] = str(write_overlays(runner, task, Path(work_dir) / "overlays.png", overlays))
    return row
