"""Model throughput with the papers' protocol (Swin's ``throughput()`` used by RepLKNet, LK.md §3.2):
``eval()``, ``no_grad``, warm-up forwards, device sync, timed forwards, device sync; img/s = iters*B/dt.
Also the training-step throughput (forward + backward + optimizer step).
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DTYPES", "environment", "synchronize", "time_fn", "inference_throughput", "train_throughput"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def environment(device: torch.device | str = "cpu") -> dict:
    """Device and library versions for result files."""
    import lkvision

    device = torch.device(device)
    env = {"torch": torch.__version__, "lkvision": lkvision.__version__, "python": sys.version.split()[0],
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        pass
    return env


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int, iters: int) -> float:
    """Seconds for ``iters`` calls of ``fn`` after ``warmup`` calls, with device syncs around the timed loop."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return time.perf_counter() - t0


def _prepare(model: nn.Module, deploy: bool, dtype: torch.dtype, channels_last: bool, device) -> nn.Module:
    import lkvision

    model = model.eval()
    if deploy:
        model = lkvision.reparameterize(model, inplace=False)
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def inference_throughput(
    model: nn.Module, batch_size: int = 64, resolution: int = 224, dtype: str = "fp32", channels_last: bool = False,
    deploy: bool = False, compile: bool = False, warmup: int = 50, iters: int = 30,
    device: torch.device | str = "cpu",
) -> dict:
    """Images/s of ``model`` in eval mode under ``no_grad`` (weights and input cast to ``dtype``).

    ``deploy``: time the re-parameterized form. ``compile``: ``torch.compile`` the model first (compile time
    is spent in the warm-up and reported separately). Returns ``dict(img_s, ms_per_batch, compile_s, ...)``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    m = _prepare(model, deploy, dt, channels_last, device)
    x = torch.randn(batch_size, int(getattr(model, "in_chans", 3)), resolution, resolution, device=device, dtype=dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    compile_s = 0.0
    if compile:
        m = torch.compile(m)
        t0 = time.perf_counter()
        with torch.no_grad():
            m(x)
        synchronize(device)
        compile_s = time.perf_counter() - t0
    with torch.no_grad():
        secs = time_fn(lambda: m(x), device, warmup, iters)
    return {"img_s": iters * batch_size / secs, "ms_per_batch": 1e3 * secs / iters, "compile_s": compile_s,
            "batch_size": batch_size, "resolution": resolution, "dtype": dtype, "channels_last": channels_last,
            "deploy": deploy, "compile": compile, "warmup": warmup, "iters": iters}


def train_throughput(
    model: nn.Module, batch_size: int = 32, resolution: int = 224, dtype: str = "fp32", channels_last: bool = False,
    compile: bool = False, warmup: int = 5, iters: int = 10, device: torch.device | str = "cpu", lr: float = 1e-4,
) -> dict:
    """Training steps/s and images/s: forward + cross-entropy + backward + AdamW step (train mode; bf16/fp16
    via autocast with fp32 weights; fp16 uses a GradScaler on CUDA). The model's weights are modified."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    m = model.to(device).train()
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    step_model = torch.compile(m) if compile else m
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    x = torch.randn(batch_size, int(getattr(model, "in_chans", 3)), resolution, resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n_cls = int(getattr(model, "num_classes", 1000)) or 1000
    y = torch.randint(0, n_cls, (batch_size,), device=device)
    use_amp = dtype != "fp32"
    scaler = torch.amp.GradScaler(device.type) if (dtype == "fp16" and device.type == "cuda") else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=use_amp):
            out = step_model(x)
            if isinstance(out, (list, tuple)):
                out = out[-1]
            if out.ndim > 2:
                out = out.mean(dim=tuple(range(2, out.ndim)))
            loss = nn.functional.cross_entropy(out.float(), y % out.shape[-1])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    secs = time_fn(step, device, warmup, iters)
    return {"img_s": iters * batch_size / secs, "ms_per_step": 1e3 * secs / iters, "batch_size": batch_size,
            "resolution": resolution, "dtype": dtype, "channels_last": channels_last, "compile": compile,
            "warmup": warmup, "iters": iters}
