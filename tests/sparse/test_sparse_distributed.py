"""Masks stay identical across ranks (2 CPU processes, gloo): densities and masks are broadcast from rank 0."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lkvision.sparse import Masking, SparseConfig


class _SW(nn.Module):
    is_shiftwise = True

    def __init__(self, c: int = 4, nk: int = 16):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(c, c * nk, 3, padding=1, groups=c, bias=False) for _ in range(2))
        self.mix = nn.Conv2d(c * nk, c, 1)

    def forward(self, x):
        return self.mix(sum(b(x) for b in self.branches))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.sw1, self.sw2 = _SW(), _SW()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.sw1(x)
        x = x + self.sw2(x)
        return self.head(x.mean((2, 3)))


def _run(rank: int, world: int, broadcast: bool) -> str:
    if True:
        torch.manual_seed(0)
        model = _Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # rank-dependent seed and data (no DDP gradient averaging): without broadcasting, masks would differ
        cfg = SparseConfig(mode="sw_coarse", init="snip", update_every=1, sync_gap=2, total_steps=10,
                           seed=rank, broadcast=broadcast)
        g = torch.Generator().manual_seed(100 + rank)
        data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
        masking = Masking(model, cfg, optimizer=opt)
        masking.init(data[0])
        for x, y in data:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            masking.step()
            opt.zero_grad()
        flat = torch.cat([masking.masks[n].reshape(-1).to(torch.uint8) for n in sorted(masking.masks)])
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([flat.numel()]))
        same = len({int(s) for s in sizes}) == 1
        if same:
            flats = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(flats, flat)
            same = all(torch.equal(flats[0], f) for f in flats)
        return f"{int(same)} {masking.updates} {masking.syncs}"


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = [_run(rank, world, broadcast) for broadcast in (True, False)]
        if rank == 0:
            with open(out, "w") as f:
                f.write("\n".join(res))
        dist.barrier()  # both ranks done before the teardown
    finally:
        dist.destroy_process_group()


def test_masks_identical_across_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "result.txt"
    # fork: the children do not re-import torch (seconds on a loaded machine); they use one thread
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 120 s")
    with_broadcast, without = (tuple(map(int, line.split())) for line in out.read_text().splitlines())
    assert with_broadcast == (1, 4, 2)  # ranks agree; 4 updates (u=1), syncs at updates 2 and 4
    assert without == (0, 4, 2)  # control: rank-local seeds/data give different masks without broadcast
