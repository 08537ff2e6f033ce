"""A small long-range task: do two far-apart markers lie on the same row?

Each 32x32 grey image holds noise and two bright 2x2 markers, one in the left quarter and one in the right
quarter (>= 16 pixels apart). Label 1: both markers on the same row; label 0: rows differ by >= 3. Local
features pooled over the image cannot solve it (the pooled statistics of the two classes are the same);
a network must relate pixels ~20 pixels apart.

Three networks of the same macro design (stride-2 stem -> 16x16 maps, 2 residual blocks of
[depth-wise spatial layer -> BN -> 1x1 MLP], global pooling, linear head), differing only in the spatial layer:

* ``dw3`` / ``dw3_wide``: a plain 3x3 depth-wise conv, widened to the parameters of sw31 / replk31,
* ``replk31``: ``ReparamLargeKernelConv`` 31x31 with a 5x5 re-param branch,
* ``sw31``: ``ShiftWiseConv2d`` with M=31 (3x3 filters, 2 Rep branches, 4 edges, no ghost channels).

Trained with AdamW on CPU for a few minutes; prints params and test accuracy (mean over seeds).

    python benchmarks/long_range_task.py --steps 300 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def make_batch(n: int, g: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    r1 = torch.randint(0, size - 1, (n,), generator=g)
    shift = torch.randint(3, size - 1, (n,), generator=g)  # rows differ by >= 3 for negatives
    r2 = torch.where(y == 1, r1, (r1 + shift) % (size - 1))
    bad = (y == 0) & ((r2 - r1).abs() < 3)
    r2 = torch.where(bad, (r1 + size // 2) % (size - 1), r2)
    c1 = torch.randint(0, size // 4 - 1, (n,), generator=g)
    c2 = torch.randint(3 * size // 4, size - 1, (n,), generator=g)
    for i in range(n):
        x[i, 0, r1[i]:r1[i] + 2, c1[i]:c1[i] + 2] = 1.0
        x[i, 0, r2[i]:r2[i] + 2, c2[i]:c2[i] + 2] = 1.0
    return x, y


def spatial_layer(kind: str, c: int) -> nn.Module:
    if kind in ("dw3", "dw3_wide"):
        return nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    if kind == "replk31":
        from lkvision.layers import ReparamLargeKernelConv

        return ReparamLargeKernelConv(c, 31, 5)
    if kind == "sw31":
        from lkvision.layers import ShiftWiseConv2d

        return ShiftWiseConv2d(c, 31, 3, num_branches=2, edges=4, ghost_ratio=0.0)
    raise ValueError(kind)


class Block(nn.Module):
    def __init__(self, kind: str, c: int):
        super().__init__()
        self.spatial = spatial_layer(kind, c)
        self.norm = nn.BatchNorm2d(c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        return x + self.mlp(self.norm(self.spatial(x)))


class Net(nn.Module):
    def __init__(self, kind: str, c: int, depth: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.GELU())
        self.blocks = nn.Sequential(*[Block(kind, c) for _ in range(depth)])
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# widths: dw3 ~ the parameters of sw31, dw3_wide ~ those of replk31 (its 31x31 kernels dominate)
WIDTHS = {"dw3": 48, "dw3_wide": 92, "replk31": 32, "sw31": 32}


def run(kind: str, seed: int, steps: int, batch: int, lr: float) -> dict:
    torch.manual_seed(seed)
    model = Net(kind, WIDTHS[kind])
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1000 + seed)
    t0 = time.time()
    model.train()
    for _ in range(steps):
        x, y = make_batch(batch, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    gt = torch.Generator().manual_seed(99)  # same test set for every model
    correct = total = 0
    with torch.no_grad():
        for _ in range(8):
            x, y = make_batch(256, gt)
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    return {"model": kind, "seed": seed, "params": params, "test_acc": correct / total,
            "train_s": time.time() - t0, "final_loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["dw3", "dw3_wide", "replk31", "sw31"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for kind in args.models:
        for seed in args.seeds:
            r = run(kind, seed, args.steps, args.batch_size, args.lr)
            print(json.dumps(r))
            rows.append(r)
    print(f"{'model':<8} {'params':>8} {'test acc (mean over seeds)':>28}")
    for kind in args.models:
        rs = [r for r in rows if r["model"] == kind]
        print(f"{kind:<8} {rs[0]['params']:>8} {sum(r['test_acc'] for r in rs) / len(rs):>28.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
