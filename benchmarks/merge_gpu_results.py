"""Merge the JSON result files of several GPU steps (``run_gpu_all.sh``) into one results folder.

Each device command writes its records into its own ``$OUT`` folder; this appends the records of every
``gpu_*.json`` found in the given folders to the file of the same name in ``--into`` (default
``benchmarks/results``), skipping records that are already there (identical JSON)::

    python benchmarks/merge_gpu_results.py /path/to/out_sw_op /path/to/out_table1_r16 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import RESULTS  # noqa: E402

from lkvision.fileio import atomic_write_json  # noqa: E402

NAMES = ("gpu_dwconv_table1.json", "gpu_sw_op.json", "gpu_models.json")


def merge(sources: list[Path], into: Path) -> dict[str, int]:
    """Append new records; returns the number added per file name."""
    added: dict[str, int] = {}
    for name in NAMES:
        dest = into / name
        rows = json.loads(dest.read_text()) if dest.exists() else []
        seen = {json.dumps(r, sort_keys=True) for r in rows}
        n = 0
        for src in sources:
            path = src / name
            if not path.exists() or path.resolve() == dest.resolve():
                continue
            for r in json.loads(path.read_text()):
                key = json.dumps(r, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
                    n += 1
        if n:
            atomic_write_json(dest, rows, indent=1)
        added[name] = n
    return added


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path, nargs="+", help="folders holding gpu_*.json files")
    ap.add_argument("--into", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for name, n in merge(args.sources, args.into).items():
        print(f"{args.into / name}: {n} records added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
