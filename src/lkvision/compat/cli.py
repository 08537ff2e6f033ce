"""``lkvision convert``: official checkpoint -> lkvision safetensors (any family in lkvision.compat).

Example::

    lkvision convert --family shiftwise --src SW_tiny.pth --dst sw_tiny.safetensors --model sw_tiny

The official constructor arguments come from ``--model NAME`` (``lkvision.compat.<family>.MODEL_KWARGS``)
and/or ``--kwargs JSON`` (applied on top). The output's safetensors metadata records the family, the model
name, our constructor kwargs and the official kwargs, so :func:`load_converted` rebuilds the model without
any other information.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from torch import nn

from ..cli import UsageError, command
from ..models._weights import ALLOW_PICKLE_HELP

__all__ = ["main", "convert", "load_converted"]

_META_PREFIX = "lkvision."


def _official_kwargs(family: str, model: str | None, kwargs_json: str | None) -> dict:
    mod = importlib.import_module(f"lkvision.compat.{family}")
    kw: dict = {}
    if model:
        table = getattr(mod, "MODEL_KWARGS", {})
        if model not in table:
            raise UsageError(f"unknown {family} model {model!r}; known: {sorted(table)}")
        kw.update(table[model])
    if kwargs_json:
        src = Path(kwargs_json)
        text = src.read_text() if not kwargs_json.lstrip().startswith("{") and src.is_file() else kwargs_json
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--kwargs is not valid JSON (or a JSON file): {e}") from e
        if not isinstance(extra, dict):
            raise UsageError(f"--kwargs must be a JSON object, got {type(extra).__name__}")
        kw.update(extra)
    return kw


def convert(family: str, src: str | Path, dst: str | Path, model_name: str | None = None,
            official_kwargs: dict | None = None, allow_pickle: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """Load an official checkpoint, build our model, save it as safetensors with metadata.

    ``allow_pickle``: see :func:`lkvision.models.load_state_dict_file` (only for files you trust).

    Returns ``(model, metadata)``.
    """
    from ..models._weights import load_state_dict_file, save_weights
    from . import canonical_family, from_official

    fam = canonical_family(family)
    kw = dict(official_kwargs or {})
    sd = load_state_dict_file(src, allow_pickle=allow_pickle)
    model = from_official(fam, sd, **kw)
    model_kwargs = getattr(model, "config", None)
    try:
        model_kwargs_json = json.dumps(model_kwargs) if isinstance(model_kwargs, dict) else ""
    except TypeError:  # a family whose config is not JSON: rebuild from the official kwargs instead
        model_kwargs_json = ""
    meta = {
        _META_PREFIX + "family": fam,
        _META_PREFIX + "model": model_name or "",
        _META_PREFIX + "class": f"{type(model).__module__}.{type(model).__qualname__}",
        _META_PREFIX + "model_kwargs": model_kwargs_json,
        _META_PREFIX + "official_kwargs": json.dumps(kw),
        _META_PREFIX + "source": Path(src).name,
    }
    save_weights(model, dst, metadata=meta)
    return model, meta


def load_converted(path: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`convert` (metadata -> constructor) and load its weights (a converted
    deploy-form checkpoint rebuilds in that form)."""
    from safetensors import safe_open

    from ..models import create_model, load_state_dict_file, load_weights
    from ._common import reparameterize_to_match

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    name = meta.get(_META_PREFIX + "model", "")
    kwargs = json.loads(meta[_META_PREFIX + "model_kwargs"]) if meta.get(_META_PREFIX + "model_kwargs") else {}
    if name:
        model = create_model(name, **kwargs)
    elif meta.get(_META_PREFIX + "class"):
        mod, _, cls = meta[_META_PREFIX + "class"].rpartition(".")
        model = getattr(importlib.import_module(mod), cls)(**kwargs)
    else:
        raise ValueError(f"{path} has no lkvision metadata (not written by `lkvision convert`)")
    sd = load_state_dict_file(path)
    reparameterize_to_match(model, sd)
    return load_weights(model, sd)


@command("lkvision convert")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="lkvision convert",
        description="Convert an official checkpoint (RepLKNet, UniRepLKNet, SLaK, ShiftWise) to lkvision "
                    "safetensors. Official constructor arguments come from --model and/or --kwargs.",
    )
    p.add_argument("--family", required=True, help="shiftwise (sw), replknet, unireplknet or slak")
    p.add_argument("--src", required=True, help="official checkpoint (.pth/.pt with 'model' or a state dict; "
                                                ".safetensors)")
    p.add_argument("--dst", required=True, help="output .safetensors file")
    p.add_argument("--model", default=None, help="lkvision model name whose official kwargs to use (e.g. sw_tiny)")
    p.add_argument("--kwargs", default=None,
                   help="official constructor kwargs as a JSON object or a JSON file (applied after --model)")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    args = p.parse_args(argv)
    if not args.model and not args.kwargs:
        p.error("give --model NAME and/or --kwargs JSON (the official constructor arguments)")
    from . import canonical_family

    fam = canonical_family(args.family)
    kw = _official_kwargs(fam, args.model, args.kwargs)
    t0 = time.perf_counter()
    try:
        model, meta = convert(fam, args.src, args.dst, args.model, kw, allow_pickle=args.allow_pickle)
    except TypeError as e:  # an official constructor argument that does not exist
        raise UsageError(f"--kwargs / --model: {e}") from e
    from ..utils import count_params

    sd = model.state_dict()
    size = Path(args.dst).stat().st_size
    print(f"family:      {fam}")
    print(f"model:       {args.model or type(model).__name__}")
    print(f"source:      {args.src}")
    print(f"official:    {json.dumps(kw)}")
    print(f"parameters:  {count_params(model):,}  ({len(sd)} tensors)")
    print(f"wrote:       {args.dst}  ({size / 2**20:.2f} MiB, {time.perf_counter() - t0:.1f} s)")
    print("load with:   lkvision.compat.cli.load_converted(path)"
          + (f"  or  lkvision.create_model({args.model!r}, pretrained=path, **model_kwargs)" if args.model else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
