"""``lkvision export``: export a model's deploy form to ONNX (checked in onnxruntime) or torch.export."""

from __future__ import annotations

import argparse
import sys

from ..cli import command
from ..models._weights import ALLOW_PICKLE_HELP


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lkvision export", description=__doc__)
    p.add_argument("--model", required=True, help="registered model name (see lkvision.list_models())")
    p.add_argument("--checkpoint", default=None, help="lkvision weights (.safetensors or torch file)")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx, or .pt2 for --format torch)")
    p.add_argument("--img-size", "--resolution", dest="img_size", type=int, default=224,
                   help="input height = width (default 224)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="fixed batch size 1 instead of a dynamic batch")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    return p


@command("lkvision export")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from .. import create_model, load_weights
    from .onnx import ExportError, example_input, export_onnx, export_program

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = create_model(args.model, **kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint, allow_pickle=args.allow_pickle)
    model.eval()
    try:
        if args.format == "onnx":
            res = export_onnx(model, args.out, args.img_size, opset=args.opset,
                              dynamic_batch=not args.static_batch, check=not args.no_check)
            msg = f"wrote {res.path} (ops: {', '.join(res.op_types)})"
            if res.max_abs_diff is not None:
                msg += f"; onnxruntime max |diff| vs PyTorch = {res.max_abs_diff:.2e}"
            print(msg)
        else:
            ep = export_program(model, example_input(model, args.img_size), dynamic_batch=not args.static_batch)
            torch.export.save(ep, args.out)
            print(f"wrote {args.out} (torch.export program of the deploy form)")
    except ExportError as e:  # the model cannot be exported: not a user error, so status 1
        print(f"lkvision export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
