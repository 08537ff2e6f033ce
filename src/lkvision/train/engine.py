"""The training / evaluation loops.

:func:`train` runs a whole recipe: data, model, optimizer, (DDP), epochs with per-step lr, gradient
accumulation, clipping, AMP, EMA, sparse masks, periodic evaluation, atomic checkpoints and exact resume,
then re-parameterization with a deploy-parity check, metrics (CSV/JSON) and the training-curve plot.
:func:`evaluate` computes loss / top-1 / top-5 / throughput of a model on a loader.

Reproducibility: the data order is a function of (seed, epoch) (:class:`~lkvision.data.ResumableSampler`),
each sample's augmentation a function of (seed, epoch, index) (:class:`~lkvision.data.EpochSeededDataset`),
the lr a function of the step, and every rank's RNG state is checkpointed -- so on CPU a run stopped after
any optimizer step and resumed reaches bit-identical weights.
"""

# ruff: noqa: NPY002 -- the legacy global numpy RNG is what timm (mixup, RandAugment) draws from,
# so it is seeded, saved and restored on purpose.
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import ResumableSampler, build_datasets, build_mixup, build_train_loss
from ..fileio import atomic_write_json, atomic_write_text
from ..ops import autoselect
from .checkpoint import (
    ResumePoint,
    check_checkpoint,
    latest_valid_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    unwrap_model,
)
from .ema import ModelEma
from .optim import build_optimizer, effective_lr, lr_at, set_lr
from .stop import GracefulStop, TrainingInterrupted, ignore_stop_signals

__all__ = ["train", "evaluate", "build_model", "make_loader", "autocast_ctx", "deploy_parity", "run_files",
           "mask_digest"]


class _Logger:
    def __init__(self, info: DistInfo, output: Path | None) -> None:
        self.info = info
        self.file = None
        if info.is_main and output is not None:
            output.mkdir(parents=True, exist_ok=True)
            self.file = open(output / "log.txt", "a")  # noqa: SIM115 - closed in close()

    def __call__(self, msg: str) -> None:
        if not self.info.is_main:
            return
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
        except ImportError:  # pragma: no cover
            print(msg, flush=True)
        self.to_file(msg)

    def to_file(self, msg: str) -> None:
        if self.file is not None:
            self.file.write(msg + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def autocast_ctx(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """``lkvision.create_model`` with the config's model name, classes, channels and drop path."""
    from ..models import create_model

    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_chans", in_chans)
    if cfg.drop_path:
        kwargs.setdefault("drop_path_rate", cfg.drop_path)
    try:
        return create_model(cfg.model, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ConfigError(f"recipe key 'model_kwargs' for {cfg.model!r}: {e}{_kwarg_hint(cfg.model, str(e))}") from e


def _kwarg_hint(model_name: str, message: str) -> str:
    """``"; did you mean 'drop_path_rate'?"`` for the keyword named in a constructor's TypeError."""
    import difflib
    import inspect
    import re

    from ..models import create_model

    m = re.search(r"unexpected keyword argument '([^']+)'", message)
    params: list[str] = []
    for kwargs in ({"device": "meta"}, {}):  # meta: no memory, no init; not every model takes device=
        try:
            params = list(inspect.signature(type(create_model(model_name, **kwargs)).__init__).parameters)
            break
        except Exception:  # noqa: BLE001, S112 - only a hint
            continue
    params = [p for p in params if p not in ("self", "args", "kwargs")]
    close = difflib.get_close_matches(m.group(1), params, n=1, cutoff=0.0) if m else []
    return f"; closest valid argument: {close[0]!r}" if close else ""


def make_loader(dataset, batch_size: int, sampler, workers: int, pin: bool, drop_last: bool) -> DataLoader:
    """A DataLoader with its own generator: creating an iterator must not draw from the global torch RNG
    (it would shift drop-path randomness between a straight and a resumed run). Augmentation randomness
    comes from :class:`~lkvision.data.EpochSeededDataset`, not from worker seeds."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin, drop_last=drop_last, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0),
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    if len(batch) == 3:
        x, y, ok = batch
        return x, y, int((~ok.bool()).sum())
    x, y = batch
    return x, y, 0


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: DistInfo | None = None, amp: str = "none",
             channels_last: bool = False, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Loss, top-1 / top-5 accuracy (%) and images/s of ``model`` over ``loader`` (summed over ranks)."""
    info = info or DistInfo(device=device)
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    t0 = time.perf_counter()
    it = loader
    if progress and info.is_main:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in it:
        x, y, _ = _split_batch(batch)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(amp, device):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y[:, None])
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        count += y.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], info)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "images": int(count), "img_per_s": count / max(elapsed, 1e-9)}


@torch.no_grad()
def deploy_parity(model: nn.Module, deploy: nn.Module, x: torch.Tensor) -> float:
    """Max |logits(train form, eval mode) - logits(deploy form)| on ``x``."""
    model.eval()
    deploy.eval()
    return (model(x).float() - deploy(x).float()).abs().max().item()


def _sparse_masking(cfg: TrainConfig, model: nn.Module, total_steps: int, optimizer: torch.optim.Optimizer):
    """Build ``lkvision.sparse.Masking`` from ``cfg.sparse`` (imported lazily)."""
    import dataclasses

    try:
        from ..sparse import Masking, SparseConfig
    except ImportError as e:
        raise ConfigError(f"recipe enables sparse training but lkvision.sparse is unavailable: {e}") from e
    opts = {k: v for k, v in cfg.sparse.items() if k != "enabled"}
    if dataclasses.is_dataclass(SparseConfig):
        names = {f.name for f in dataclasses.fields(SparseConfig)}
        bad = [k for k in opts if k not in names]
        if bad:
            raise ConfigError(f"unknown sparse option(s) {bad}; SparseConfig fields: {sorted(names)}")
        if "total_steps" in names and "total_steps" not in opts:
            opts["total_steps"] = total_steps
    # the optimizer lets the masks also zero SGD momentum (and Adam moments when asked) and enables momentum growth
    return Masking(model, SparseConfig(**opts), optimizer=optimizer)


class _History:
    """Per-epoch rows (metrics.csv), per-step train losses (for the curve) and, with sparse training, the
    sparse-mask digest of every rank after every mask update; kept in checkpoints."""

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.epochs: list[dict[str, Any]] = list(state.get("epochs", []))
        self.steps: list[list[float]] = [list(s) for s in state.get("steps", [])]
        self.mask_digests: list[list] = [list(s) for s in state.get("mask_digests", [])]

    def state(self) -> dict:
        return {"epochs": self.epochs, "steps": self.steps, "mask_digests": self.mask_digests}


def mask_digest(masks: dict[str, torch.Tensor]) -> str:
    """A short hash of a set of sparse masks (names and values): equal masks, equal digest, on any device."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _record_mask_update(hist: _History, masking, step: int, info: DistInfo, log) -> None:
    """After a prune/grow update: gather every rank's mask digest into the history; say so if they differ."""
    digests = [mask_digest(masking.masks)]
    if info.enabled:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, digests[0])
        digests = gathered
    hist.mask_digests.append([step, digests])
    if len(set(digests)) > 1:
        log(f"WARNING: sparse masks differ across ranks after the mask update at step {step} ({digests}); "
            "keep sparse.broadcast: true")


#: files that mark an output folder as holding a run (``log.txt`` alone does not)
_RUN_FILES = ("best.safetensors", "final.safetensors", "deploy.safetensors", "metrics.json", "metrics.csv",
              "curves.png")


def run_files(output: str | Path) -> list[Path]:
    """The files of an earlier run in ``output``: checkpoints, best/final/deploy weights, metrics, curves."""
    out = Path(output)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_file() and (
        p.name in _RUN_FILES or (p.name.startswith("ckpt-") and p.name.endswith((".state.pt", ".safetensors")))))


def _claim_output(cfg: TrainConfig, info: DistInfo) -> None:
    """Refuse to write a new run over an existing one (unless ``overwrite``, which deletes the old run's files).

    Rank 0 looks at the folder and tells the others, so that every rank raises (or goes on) together."""
    if cfg.resume:
        return
    found = [p.name for p in run_files(cfg.output)] if info.is_main else []
    found = broadcast_object(found, info)
    if not found:
        return
    if not cfg.overwrite:
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} files)" if len(found) > 4 else "")
        raise ConfigError(f"output folder {cfg.output} already holds a run ({shown}): continue it with "
                          "--resume auto, write to another --output, or pass --overwrite to replace it")
    if info.is_main:
        for name in [*found, "log.txt"]:
            with contextlib.suppress(FileNotFoundError):
                (Path(cfg.output) / name).unlink()
    barrier(info)


def _write_metrics(output: Path, hist: _History, summary: dict | None) -> None:
    if hist.epochs:
        keys: list[str] = []
        for row in hist.epochs:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(hist.epochs)
        atomic_write_text(output / "metrics.csv", buf.getvalue())
    atomic_write_json(output / "metrics.json", {"epochs": hist.epochs, "summary": summary or {}})


def train(cfg: TrainConfig, info: DistInfo | None = None, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Run the recipe ``cfg``; returns the summary dict (also written to ``<output>/metrics.json``).

    ``allow_pickle``: unpickle the ``finetune`` file fully (:func:`lkvision.load_weights`; only for files you
    trust). It is an argument, not a recipe key, so that a recipe can never opt in on a user's behalf.
    """
    own_dist = info is None
    info = info or init_distributed(cfg.device, cfg.dist_backend)
    finished = False
    try:
        summary = _train(cfg, info, allow_pickle)
        finished = True
        return summary
    finally:
        if own_dist:
            cleanup_distributed(info, finished)


def _train(cfg: TrainConfig, info: DistInfo, allow_pickle: bool = False) -> dict[str, Any]:
    _claim_output(cfg, info)
    log = _Logger(info, Path(cfg.output))
    try:
        with GracefulStop(announce=info.is_main) as stop, _no_timed_choices(cfg.deterministic):
            return _run(cfg, info, log, stop, allow_pickle)  # (the stop handler is armed for the loop only)
    finally:
        log.close()


def _run(cfg: TrainConfig, info: DistInfo, log: _Logger, stop: GracefulStop,
         allow_pickle: bool = False) -> dict[str, Any]:
    device = info.device
    output = Path(cfg.output)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # (train() also turns off kernel choice by timing for the run)
        torch.use_deterministic_algorithms(True)

    # ------------------------------------------------------------------ data
    train_set, val_set, data_info = build_datasets(cfg)
    num_classes = cfg.num_classes or data_info["num_classes"]
    in_chans = cfg.in_chans or data_info["in_chans"]
    mixup_fn = build_mixup(cfg, num_classes)
    if mixup_fn is not None and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
    train_sampler = ResumableSampler(len(train_set), True, cfg.seed, info.rank, info.world_size, drop_last=True)
    val_sampler = ResumableSampler(len(val_set), False, cfg.seed, info.rank, info.world_size, pad=False)
    pin = cfg.pin_mem and device.type == "cuda"
    train_loader = make_loader(train_set, cfg.batch_size, train_sampler, cfg.workers, pin, drop_last=True)
    val_loader = make_loader(val_set, cfg.eval_batch_size or 2 * cfg.batch_size, val_sampler, cfg.workers, pin,
                             drop_last=False)
    micro_per_epoch = train_sampler.per_rank // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.update_freq
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch has no optimizer step: {train_sampler.per_rank} samples per rank < batch_size "
            f"{cfg.batch_size} x update_freq {cfg.update_freq}"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * steps_per_epoch))

    # ------------------------------------------------------------------ model
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg, num_classes, in_chans)
    if cfg.finetune:
        _load_finetune(model, cfg.finetune, log, allow_pickle)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            raise ConfigError(f"model {cfg.model!r} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    if info.enabled and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    n_params = sum(p.numel() for p in model.parameters())
    loss_fn = build_train_loss(cfg, mixup_fn is not None)
    lr = effective_lr(cfg, info.world_size)
    optimizer = build_optimizer(model, cfg, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
    masking = _sparse_masking(cfg, model, total_steps, optimizer) if cfg.sparse.get("enabled") else None

    # ------------------------------------------------------------------ resume
    start_step = 0
    hist = _History()
    best: dict[str, Any] = {"top1": -1.0}
    resume_state = None
    point = _find_resume_point(cfg, output, info, log)
    if point is not None:
        from ..models import load_weights

        _load_kernel_choices(output / AUTOSELECT_TABLE, log)

        resume_path, resume_state = point.path, point.state
        load_weights(model, point.weights)
        optimizer.load_state_dict(resume_state["optimizer"])
        if "scaler" in resume_state and resume_state["scaler"]:
            scaler.load_state_dict(resume_state["scaler"])
        if ema is not None:
            if resume_state.get("ema") is None:
                raise ConfigError(f"{resume_path} has no EMA state but the recipe has ema: true")
            ema.module.load_state_dict(resume_state["ema"])
            ema.updates = int(resume_state.get("ema_updates", 0))
        if masking is not None:
            if resume_state.get("sparse") is None:
                raise ConfigError(f"{resume_path} has no sparse-mask state but the recipe enables sparse")
            masking.load_state_dict(resume_state["sparse"])
        start_step = int(resume_state["step"])
        hist = _History(resume_state.get("history"))
        best = dict(resume_state.get("best", best))
        if int(resume_state.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            warnings.warn("resuming with a different steps-per-epoch (batch size / world size changed): the "
                          "data order after resume differs from the original run", stacklevel=2)
        log(f"resumed from {resume_path} at step {start_step}")
        if point.changed:
            log(f"resumed with changed settings: {'; '.join(point.changed)}")
    elif masking is not None:
        sample = _first_batch(train_set, train_sampler, cfg.batch_size)
        masking.init((sample[0].to(device), sample[1].to(device)), nn.CrossEntropyLoss())

    train_model: nn.Module = model
    if info.enabled:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=cfg.find_unused_parameters, **ddp_kw)
    if cfg.compile:
        train_model = torch.compile(train_model)

    # per-rank training randomness (drop path, mixup); restored exactly on resume
    torch.manual_seed(cfg.seed * 1000 + 17 + info.rank)
    import random

    import numpy as np

    np.random.seed((cfg.seed * 1000 + 17 + info.rank) % 2**32)
    random.seed(cfg.seed * 1000 + 17 + info.rank)
    if resume_state is not None:
        rngs = resume_state["rng"]
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        else:
            warnings.warn(f"checkpoint has RNG states of {len(rngs)} ranks, this run has {info.world_size}: "
                          "RNG streams are not restored", stacklevel=2)

    log(f"model {cfg.model}: {n_params / 1e6:.3f} M params | data {cfg.data}: {len(train_set)} train / "
        f"{len(val_set)} val, {num_classes} classes | world {info.world_size} x batch {cfg.batch_size} x "
        f"update_freq {cfg.update_freq} = {cfg.batch_size * cfg.update_freq * info.world_size} | lr {lr:.3g} | "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | device {device}")

    # ------------------------------------------------------------------ loop
    step = start_step
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    skipped_total = int(resume_state.get("skipped", 0)) if resume_state else 0
    t_start = time.perf_counter()
    stopped_early = False
    cur_lr = lr_at(step, lr, total_steps, warmup, cfg.min_lr, cfg.warmup_lr)
    acc: dict[str, float] = {"loss_sum": 0.0, "loss_n": 0}

    def make_state(epoch: int, step_: int) -> dict[str, Any]:
        rngs = [rng_state()]
        if info.enabled:
            gathered: list[Any] = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "sparse": masking.state_dict() if masking is not None else None,
            "rng": rngs, "epoch": epoch, "steps_per_epoch": steps_per_epoch, "history": hist.state(),
            "best": best, "skipped": skipped_total, "epoch_loss": [acc["loss_sum"], acc["loss_n"]],
            "config": cfg.to_dict(), "world_size": info.world_size,
            "model": cfg.model,
        }

    last_save: dict[str, Any] = {"step": None, "path": None}

    def save(epoch: int, step_: int) -> None:
        state = make_state(epoch, step_)  # collective under DDP: every rank takes part
        if info.is_main:
            save_checkpoint(output, step_, unwrap_model(model).state_dict(), state)
            prune_checkpoints(output, cfg.keep_last)
            autoselect.save_table(output / AUTOSELECT_TABLE)  # the kernel choices made so far (see resume)
        last_save.update(step=step_, path=output / f"ckpt-{step_:08d}.state.pt")
        barrier(info)

    def stop_if_requested(epoch: int, pbar) -> None:
        """At a step boundary: if any rank got SIGINT/SIGTERM, every rank checkpoints this step and raises."""
        signum = stop.agreed(info)  # collective under DDP
        if not signum:
            return
        if pbar is not None:
            pbar.close()
        if last_save["step"] != step:
            save(epoch, step)
        raise TrainingInterrupted(signum, step, last_save["path"])

    stop.arm()  # Ctrl-C / SIGTERM from here on: finish the step, checkpoint, stop
    for epoch in range(start_step // steps_per_epoch, cfg.epochs):
        if step >= stop_at:
            break
        in_epoch = step - epoch * steps_per_epoch
        train_sampler.set_epoch(epoch, start=in_epoch * cfg.update_freq * cfg.batch_size)
        train_model.train()
        if resume_state is not None and step == start_step and in_epoch > 0:
            acc["loss_sum"], acc["loss_n"] = resume_state.get("epoch_loss", [0.0, 0])
        else:
            acc["loss_sum"], acc["loss_n"] = 0.0, 0
        t_epoch = time.perf_counter()
        pbar = None
        if cfg.progress and info.is_main:
            from tqdm import tqdm

            pbar = tqdm(total=steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                        dynamic_ncols=True, leave=False)
        micro = 0
        optimizer.zero_grad(set_to_none=True)
        for batch in train_loader:
            if in_epoch >= steps_per_epoch or step >= stop_at:
                break
            x, y, skipped = _split_batch(batch)
            skipped_total += skipped
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            micro += 1
            last_micro = micro % cfg.update_freq == 0
            sync_ctx = train_model.no_sync() if (info.enabled and not last_micro) else contextlib.nullcontext()
            with sync_ctx:
                with autocast_ctx(cfg.amp, device):
                    out = train_model(x)
                    loss = loss_fn(out.float(), y)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step} (epoch {epoch})")
                scaler.scale(loss / cfg.update_freq).backward()
            acc["loss_sum"] += loss.item()
            acc["loss_n"] += 1
            if not last_micro:
                continue
            set_lr(optimizer, lr_at(step, lr, total_steps, warmup, cfg.min_lr, cfg.warmup_lr))
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            # with fp16 the scaler skips the step on inf/nan grads (and lowers its scale)
            stepped = not scaler.is_enabled() or scaler.get_scale() >= scale_before
            mask_updated = masking.step(optimizer_stepped=stepped) if masking is not None else False
            if ema is not None:
                ema.update(model)
            step += 1
            in_epoch += 1
            if mask_updated:
                _record_mask_update(hist, masking, step, info, log)
            cur_lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
            hist.steps.append([step, loss.item(), cur_lr])
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{cur_lr:.2e}")
            if cfg.log_every and step % cfg.log_every == 0 and pbar is None:
                log(f"step {step}/{total_steps} loss {loss.item():.4f} lr {cur_lr:.3e}")
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and in_epoch < steps_per_epoch:
                save(epoch, step)
            if in_epoch < steps_per_epoch:  # the last step of an epoch stops after the epoch's evaluation
                stop_if_requested(epoch, pbar)
        if pbar is not None:
            pbar.close()
        epoch_done = in_epoch >= steps_per_epoch
        if not epoch_done:  # stopped by max_steps inside the epoch
            stopped_early = True
            save(epoch, step)
            break
        sums = all_reduce_sum([acc["loss_sum"], acc["loss_n"]], info)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": sums[0] / max(sums[1], 1),
                               "lr": cur_lr, "epoch_time_s": round(time.perf_counter() - t_epoch, 2),
                               "skipped_images": skipped_total}
        last_epoch = epoch + 1 == cfg.epochs
        due = cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch >= cfg.eval_start_epoch
        if due or last_epoch:
            ev = evaluate(model, val_loader, device, info, cfg.amp, cfg.channels_last, cfg.progress)
            row.update(val_loss=ev["loss"], val_top1=ev["top1"], val_top5=ev["top5"])
            if ema is not None and cfg.ema_eval:
                ev_ema = evaluate(ema.module, val_loader, device, info, cfg.amp, cfg.channels_last, False)
                row.update(ema_top1=ev_ema["top1"], ema_top5=ev_ema["top5"])
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch + 1, "step": step}
                if info.is_main:
                    from ..models import save_weights

                    save_weights(unwrap_model(model), output / "best.safetensors",
                                 metadata={"step": str(step), "top1": f"{ev['top1']:.4f}"})
        hist.epochs.append(row)
        msg = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        log(msg)
        if (cfg.save_every_epochs and (epoch + 1) % cfg.save_every_epochs == 0) or last_epoch or step >= stop_at:
            save(epoch + 1, step)
        if info.is_main:
            _write_metrics(output, hist, None)
            if cfg.plot:
                _plot(output, hist, log)
        stop_if_requested(epoch + 1, None)
        if step >= stop_at and not last_epoch:
            stopped_early = True
            break

    stop.disarm()

    train_time = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "model": cfg.model, "params_M": n_params / 1e6, "steps": step, "epochs_done": step // steps_per_epoch,
        "train_time_s": round(train_time, 2), "best": best, "skipped_images": skipped_total,
        "world_size": info.world_size, "global_batch": cfg.batch_size * cfg.update_freq * info.world_size,
        "stopped_early": stopped_early,
    }
    if hist.epochs:
        summary["final"] = {k: v for k, v in hist.epochs[-1].items() if k.startswith(("val_", "ema_", "train_"))}
    if masking is not None and callable(getattr(masking, "stats", None)):
        with contextlib.suppress(Exception):
            summary["sparse"] = _jsonable(masking.stats())

    # ------------------------------------------------------------------ deploy form
    if not stopped_early and cfg.reparam_check:
        summary["deploy"] = _deploy_check(cfg, model, val_loader, device, info, masking, log, output)
    if info.is_main:
        from ..models import save_weights

        if not stopped_early:
            save_weights(unwrap_model(model), output / "final.safetensors", metadata={"step": str(step)})
        _write_metrics(output, hist, summary)
        if cfg.plot and hist.epochs:
            _plot(output, hist, log)
    log(f"done: {step} steps in {train_time:.1f} s" + (f", best top-1 {best['top1']:.2f}%" if best["top1"] >= 0
                                                        else ""))
    return summary


def _deploy_check(cfg, model, val_loader, device, info, masking, log, output: Path) -> dict[str, Any]:
    from ..reparam import reparameterize

    base = unwrap_model(model)
    if masking is not None:
        from ..sparse import export_dense

        base = export_dense(base, masking)  # masks multiplied in (they already are after every step)
    base.eval()
    deploy = reparameterize(base, inplace=False)
    batch = next(iter(val_loader))
    x = batch[0][:8].to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    diff = deploy_parity(base, deploy, x)
    with torch.no_grad():
        scale = base(x).float().abs().max().item()
    ev = evaluate(deploy, val_loader, device, info, cfg.amp, cfg.channels_last, False)
    res = {"max_abs_logit_diff": diff, "logit_scale": scale, "top1": ev["top1"], "top5": ev["top5"],
           "params_M": sum(p.numel() for p in deploy.parameters()) / 1e6}
    ok = diff <= 1e-3 * max(1.0, scale)
    res["parity_ok"] = ok
    log(f"deploy form: max |logit diff| {diff:.3g} (scale {scale:.3g}) -> {'OK' if ok else 'MISMATCH'}; "
        f"top-1 {ev['top1']:.2f}%")
    if info.is_main:
        from ..models import save_weights

        save_weights(deploy, output / "deploy.safetensors", metadata={"form": "deploy", "model": cfg.model})
    return res


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


@contextlib.contextmanager
def _no_timed_choices(active: bool):
    """``deterministic: true``: no kernel is chosen by timing during the run (``LKVISION_AUTOSELECT=0``: every
    measured op takes its default path), restored afterwards."""
    old = os.environ.get(autoselect.ENV_ENABLE)
    if active:
        os.environ[autoselect.ENV_ENABLE] = "0"
    try:
        yield
    finally:
        if active:
            if old is None:
                os.environ.pop(autoselect.ENV_ENABLE, None)
            else:
                os.environ[autoselect.ENV_ENABLE] = old


#: the run directory's record of the kernel choices measured per problem (lkvision.ops.autoselect: the GEMM
#: library of each linear product, direct vs FFT, our depth-wise backward vs PyTorch's, ...). Rewritten with
#: every checkpoint and loaded on resume, so that a resumed run computes with the same kernels as the run it
#: continues (measured afresh, a choice could differ and the results with it, by fp32 rounding).
AUTOSELECT_TABLE = "autoselect.json"


def _load_kernel_choices(path: Path, log: _Logger) -> None:
    if not path.is_file():
        return
    try:
        n = autoselect.load_table(path)
    except ValueError as exc:  # a damaged record only costs re-measuring
        warnings.warn(f"resume: ignoring {path.name}: {exc}; kernels are measured again", stacklevel=2)
        return
    log(f"resume: {n} kernel choices from {path.name}")


def _find_resume_point(cfg: TrainConfig, output: Path, info: DistInfo, log: _Logger) -> ResumePoint | None:
    """The checkpoint to resume from, loaded and validated (``None``: start from scratch).

    ``--resume PATH``: that checkpoint or an error saying why it cannot be used. ``--resume auto``: rank 0
    takes the newest valid checkpoint, warning about each newer one it skips, and tells the other ranks which.
    """
    from ..models import CheckpointError

    if not cfg.resume:
        return None
    current = cfg.to_dict()
    if cfg.resume != "auto":
        return check_checkpoint(cfg.resume, current)
    point, chosen, error = None, None, None
    if info.is_main:
        def warn(msg: str) -> None:
            warnings.warn(msg, stacklevel=4)
            log.to_file(f"WARNING: {msg}")

        try:
            point = latest_valid_checkpoint(output, current, warn)
            chosen = None if point is None else str(point.path)
        except CheckpointError as e:
            error = str(e)
    chosen, error = broadcast_object((chosen, error), info)
    if error:
        raise CheckpointError(error)
    if chosen is None:
        log(f"resume=auto: no checkpoint in {output}, starting from scratch")
        return None
    return point if point is not None else check_checkpoint(chosen, current)


def _first_batch(dataset, sampler: ResumableSampler, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    sampler.set_epoch(0)
    keys = list(iter(sampler))[:batch_size]
    items = [dataset[k] for k in keys]
    x = torch.stack([it[0] for it in items])
    y = torch.as_tensor([int(it[1]) for it in items])
    return x, y


def _load_finetune(model: nn.Module, path: str, log, allow_pickle: bool = False) -> None:
    from ..models import load_state_dict_file, load_weights

    sd = load_state_dict_file(path, allow_pickle=allow_pickle)
    own = model.state_dict()
    head = [k for k in sd if k in own and sd[k].shape != own[k].shape and k.startswith("head")]
    for k in head:
        del sd[k]
    load_weights(model, sd, strict=not head)
    log(f"fine-tuning from {path}" + (f" (dropped classifier {head})" if head else ""))


def _plot(output: Path, hist: _History, log) -> None:
    try:
        from .plots import plot_curves

        plot_curves(hist.steps, hist.epochs, output / "curves.png")
    except Exception as e:  # noqa: BLE001 - a plotting problem must never stop training
        log(f"(could not write curves.png: {type(e).__name__}: {e})")
