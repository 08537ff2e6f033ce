"""Export of deploy-form models: ONNX (checked with onnxruntime) and ``torch.export`` programs.

The model is re-parameterised first (:func:`lkvision.reparameterize`, on a copy), so the exported graph has
one biased conv per merged depth-wise layer and no BatchNorm where the family folds it. During export every
:func:`lkvision.ops.dwconv2d` call is routed to plain ``F.pad`` + ``F.conv2d`` (:func:`plain_dwconv`), so the
graph holds standard ``Conv`` nodes and never lkvision's custom operators, which have no ONNX symbolic.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_path
from ..utils import rebind

__all__ = ["export_onnx", "export_program", "plain_dwconv", "OnnxExport", "ExportError", "example_input"]


class ExportError(RuntimeError):
    """The exported graph is not plain ONNX or its outputs differ from PyTorch's."""


@dataclass
class OnnxExport:
    """Result of :func:`export_onnx`."""

    path: Path
    op_types: list[str]
    max_abs_diff: float | None = None
    output_names: list[str] = field(default_factory=list)


def _plain_dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    padding="same", *, impl: str = "auto") -> torch.Tensor:
    """Reference depth-wise conv (stride 1) with the padding conventions of ``lkvision.ops.dwconv2d``."""
    from ..ops.dwconv import normalize_padding

    left, right, top, bottom = normalize_padding(padding, tuple(weight.shape[-2:]))
    if (left, top) == (right, bottom):
        return F.conv2d(x, weight, bias, padding=(top, left), groups=weight.shape[0])
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, groups=weight.shape[0])


@contextlib.contextmanager
def plain_dwconv() -> Iterator[None]:
    """Within the block, every ``dwconv2d`` that lkvision modules call is plain ``F.conv2d`` (exportable).

    Rebinds ``lkvision.ops.dwconv.dwconv2d`` and every ``dwconv2d`` name that an ``lkvision.*`` module
    imported from it (:func:`lkvision.utils.rebind`); restores them on exit.
    """
    try:
        from ..ops import dwconv as dw_mod
    except ImportError:  # pragma: no cover - no dispatcher: nothing to reroute
        yield
        return
    with rebind([(dw_mod.dwconv2d, _plain_dwconv2d)]):
        yield


def example_input(model: nn.Module, input_size: int | Sequence[int], batch: int = 1) -> torch.Tensor:
    """A random input for ``model``: ``input_size`` = N (-> (batch, in_chans, N, N)), (H, W), (C, H, W) or
    (B, C, H, W)."""
    in_chans = getattr(model, "in_chans", 3)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (batch, in_chans, *size)
    elif len(size) == 3:
        size = (batch, *size)
    elif len(size) != 4:
        raise ValueError(f"input_size must be N, (H, W), (C, H, W) or (B, C, H, W); got {input_size!r}")
    p = next(iter(model.parameters()), None)
    kw = dict(device=p.device, dtype=p.dtype) if p is not None and p.is_floating_point() else {}
    return torch.randn(size, generator=torch.Generator().manual_seed(0)).to(**kw)


def _deploy(model: nn.Module) -> nn.Module:
    from ..reparam import reparameterize

    return reparameterize(model, inplace=False).eval()


def _as_list(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: int | Sequence[int] = 224,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
) -> OnnxExport:
    """Export the deploy form of ``model`` to ONNX and (``check``) verify it with onnxruntime.

    ``input_size``: N, (H, W), (C, H, W) or (B, C, H, W). With ``dynamic_batch`` the batch axis is symbolic
    and the check runs at batch 2. Outputs: ``logits`` (classifiers) or ``features.{i}`` (``features_only``).
    Raises :class:`ExportError` if the graph contains non-standard operators or if onnxruntime's outputs
    differ from PyTorch's by more than ``atol * max(1, max|y|)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deploy = _deploy(model)
    x = example_input(deploy, input_size)
    with plain_dwconv():
        y = _as_list(deploy(x))
        out_names = ["logits"] if len(y) == 1 and not getattr(deploy, "features_only", False) else [
            f"features.{i}" for i in range(len(y))]
        dyn = None
        if dynamic_batch:
            dyn = {"input": {0: "batch"}, **{n: {0: "batch"} for n in out_names}}
        with warnings.catch_warnings(), atomic_path(path) as tmp:
            warnings.simplefilter("ignore")  # tracer warnings about input-shape checks
            torch.onnx.export(deploy, (x,), str(tmp), opset_version=opset, dynamo=False, input_names=["input"],
                              output_names=out_names, dynamic_axes=dyn, do_constant_folding=True)

    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    op_types = sorted({n.op_type for n in proto.graph.node})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"ONNX graph of {type(model).__name__} contains non-standard operators {custom}")
    result = OnnxExport(path=path, op_types=op_types, output_names=out_names)
    if check:
        result.max_abs_diff = check_onnx(deploy, path, x if not dynamic_batch else torch.cat([x, -x]), atol)
    return result


@torch.no_grad()
def check_onnx(deploy: nn.Module, path: str | os.PathLike, x: torch.Tensor, atol: float = 1e-4) -> float:
    """Run ``path`` in onnxruntime on ``x`` and compare with ``deploy(x)``; returns the max abs difference."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": x.detach().cpu().float().numpy()})
    with plain_dwconv():
        refs = _as_list(deploy(x))
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        r = r.detach().cpu().float()
        if tuple(o.shape) != tuple(r.shape):
            raise ExportError(f"onnxruntime output {i} has shape {tuple(o.shape)}, PyTorch {tuple(r.shape)}")
        diff = float((torch.from_numpy(o) - r).abs().max())
        tol = atol * max(1.0, float(r.abs().max()))
        if not diff <= tol:
            raise ExportError(f"onnxruntime output {i} differs from PyTorch by {diff:.3g} (> {tol:.3g})")
        worst = max(worst, diff)
    return worst


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True,
                   deploy: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of the deploy form of ``model`` (``deploy=False``: the model as it is, in eval mode).

    ``example``: an input tensor (B, C, H, W). With ``dynamic_batch`` the batch dimension is symbolic
    (1 .. 4096). Depth-wise convs appear as ``aten.conv2d``.
    """
    m = _deploy(model) if deploy else model.eval()
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    if dynamic_batch and example.shape[0] == 1:  # a size-1 example would be specialised
        example = torch.cat([example, example])
    with plain_dwconv(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(m, (example,), dynamic_shapes=shapes)
