"""Masking driver: density kept, shared-mask sync, resume, AMP, stats/export (toy models, CPU)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lkvision.sparse import (
    Masking,
    SparseConfig,
    bake_masks,
    export_dense,
    format_report,
    scaler_step,
    sparsity_report,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------- toys
class ToyShiftWise(nn.Module):
    """Stand-in for ShiftWiseConv2d: R rep branches of depth-wise one-to-many 3x3 convs (C*nk filters)."""

    is_shiftwise = True

    def __init__(self, c: int, nk: int = 8, branches: int = 2):
        super().__init__()
        self.num_branches = branches
        self.branches = nn.ModuleList(
            nn.Conv2d(c, c * nk, 3, padding=1, groups=c, bias=False) for _ in range(branches))
        self.mix = nn.Conv2d(c * nk, c, 1)  # stands in for the shift-add

    def forward(self, x):
        return self.mix(sum(b(x) for b in self.branches))


class ToyStrip(nn.Module):
    """Stand-in for the SLaK StripConv: M x N + N x M depth-wise strips + a small N x N conv."""

    is_strip_conv = True

    def __init__(self, c: int, m: int = 7, n: int = 3):
        super().__init__()
        self.horizontal = nn.Conv2d(c, c, (m, n), padding=(m // 2, n // 2), groups=c)
        self.vertical = nn.Conv2d(c, c, (n, m), padding=(n // 2, m // 2), groups=c)
        self.small = nn.Conv2d(c, c, n, padding=n // 2, groups=c)

    def forward(self, x):
        return self.horizontal(x) + self.vertical(x) + self.small(x)


class ToyNet(nn.Module):
    def __init__(self, kind: str = "sw", c: int = 8, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        make = (lambda: ToyShiftWise(c)) if kind == "sw" else (lambda: ToyStrip(c))
        self.block1, self.block2 = make(), make()
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2 * c)
        self.head = nn.Linear(2 * c, num_classes)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + self.block1(x)
        x = F.gelu(self.norm(x + self.block2(x)))
        return self.head(F.gelu(self.fc(x.mean((2, 3)))))


def batches(n: int, seed: int = 0, bs: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 5, (bs,), generator=g))
            for _ in range(n)]


def sw_cfg(**kw) -> SparseConfig:
    base = dict(mode="sw_coarse", sparsity=0.3, init="snip", prune_rate=0.3, update_every=2, sync_gap=3,
                total_steps=100, seed=0)
    base.update(kw)
    return SparseConfig(**base)


def train(model, masking, opt, data, scaler=None, amp=False, on_step=None):
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            stepped = scaler_step(scaler, opt)
        else:
            loss.backward()
            opt.step()
            stepped = True
        updated = masking.step(stepped)
        if on_step is not None:
            on_step(masking, updated)
        opt.zero_grad(set_to_none=True)


def assert_masked_weights_zero(masking):
    for n, m in masking.masks.items():
        w = masking.model.get_parameter(n).detach()
        assert torch.all((w * ~m) == 0), n


def make_sw(seed=0, **kw):
    torch.manual_seed(seed)
    model = ToyNet("sw")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masking = Masking(model, sw_cfg(**kw), optimizer=opt)
    return model, opt, masking


# ------------------------------------------------------------------------------------------ SW coarse
def test_sw_snip_init_masks_branches_per_filter():
    model, opt, masking = make_sw()
    masking.init(batches(1, seed=9)[0])
    names = {n for n in masking.masks}
    assert names <= {f"block{i}.branches.{b}.weight" for i in (1, 2) for b in (0, 1)}
    st = {s["name"]: s for s in masking.stats()}
    # SNIP: one global threshold over the concatenated filter scores of all branches -> 70 % kept overall
    units = sum(s["units"] for s in st.values())
    assert sum(masking.densities.get(s["layer"], 1.0) * s["units"] for s in st.values()) / units == \
        pytest.approx(0.7, abs=2 / units)
    for s in st.values():  # exactly round(density * filters) filters kept in each masked layer
        if s["masked"]:
            assert s["active_units"] == int(masking.densities[s["layer"]] * 64 + 0.5)
    for layer in ("block1", "block2"):
        if layer in masking.dense_layers:
            continue
        m0, m1 = masking.masks[f"{layer}.branches.0.weight"], masking.masks[f"{layer}.branches.1.weight"]
        assert m0.shape == (64, 1, 1, 1) and m0.dtype == torch.bool
        assert torch.equal(m0, m1)  # same mask on every branch at init
    assert_masked_weights_zero(masking)
    # only the SW convs are masked (only_large_kernel) and nothing else changed
    assert all(s["granularity"] == "filter" for s in st.values())
    assert masking.steps == 0 and masking.updates == 0


def test_snip_density_zero_warns():
    model, opt, masking = make_sw()
    with torch.no_grad():
        model.block2.mix.weight.zero_()  # block2's branches get no gradient -> SNIP saliency 0
    with pytest.warns(UserWarning, match="'block2' gets density 0"):
        masking.init(batches(1)[0])
    assert masking.densities["block2"] == 0.0
    assert not masking.masks["block2.branches.0.weight"].any()


@pytest.mark.parametrize("growth", ["random_sum", "gradient"])
def test_sw_training_keeps_density_and_syncs_every_gap_updates(growth):
    model, opt, masking = make_sw(init="uniform", update_every=2, sync_gap=3, growth=growth)
    masking.init()
    start = {n: int(m.sum()) for n, m in masking.masks.items()}
    assert all(v == 45 for v in start.values())  # exactly round(0.7 * 64) filters at init
    log = []

    def on_step(mk, updated):
        assert_masked_weights_zero(mk)
        if updated:
            same = all(torch.equal(mk.masks[f"{lay}.branches.0.weight"], mk.masks[f"{lay}.branches.1.weight"])
                       for lay in ("block1", "block2"))
            log.append((mk.steps, mk.syncs, same, {n: int(m.sum()) for n, m in mk.masks.items()}))

    train(model, masking, opt, batches(24), on_step=on_step)
    assert [e[0] for e in log] == list(range(2, 25, 2))  # an update every u=2 steps
    sync_steps = [e[0] for i, e in enumerate(log) if e[1] > (log[i - 1][1] if i else 0)]
    assert sync_steps == [6, 12, 18, 24]  # k = 3, 6, 9, 12: every gap=3 updates
    assert masking.syncs == 4 and masking.updates == 12
    assert all(e[2] for e in log if e[0] in sync_steps)  # branch masks shared right after a sync
    assert not all(e[2] for e in log if e[0] not in sync_steps)  # and they drift apart in between
    if growth == "gradient":  # exact regrowth: every branch keeps its filter count after every update
        assert all(e[3] == start for e in log)
    else:  # random_sum keeps the count in expectation (a random walk): loose bound on the total
        total0 = sum(start.values())
        assert all(abs(sum(e[3].values()) - total0) <= 0.1 * total0 for e in log)


def test_sw_sync_scores_sum_over_branches():
    """On a sync update branch 0's new mask ranks filters by sum_b sum_3x3 |W_b| and is copied to all."""
    model, opt, masking = make_sw(init="uniform", sparsity=0.5, update_every=1, sync_gap=1, prune_rate=0.25,
                                  growth="gradient")
    masking.init()
    layer = model.block1
    with torch.no_grad():
        for b, conv in enumerate(layer.branches):  # filter f of branch b: |w| = f + 1 (b = 0) or 100 (b = 1, f < 8)
            conv.weight.copy_((torch.arange(64).float() + 1).view(64, 1, 1, 1).expand(64, 1, 3, 3) if b == 0
                              else (100.0 * (torch.arange(64) < 8).float()).view(64, 1, 1, 1).expand(64, 1, 3, 3))
    m0 = torch.zeros(64, 1, 1, 1, dtype=torch.bool)
    m0[32:] = True  # branch 0 keeps filters 32..63
    masking.masks["block1.branches.0.weight"] = m0
    masking.masks["block1.branches.1.weight"] = torch.ones(64, 1, 1, 1, dtype=torch.bool)
    masking.apply_masks()
    for conv in [*model.block1.branches, *model.block2.branches]:
        conv.weight.grad = torch.zeros_like(conv.weight)
    masking.steps = 1
    rate = masking.prune_rate
    assert masking.update() is True
    new0, new1 = masking.masks["block1.branches.0.weight"], masking.masks["block1.branches.1.weight"]
    assert torch.equal(new0, new1)
    # nnz 32, remove ceil(rate*32); scores: filters 0..7 have 100 (branch 1), 32..63 have f+1 (+0)
    keep = 32 - int(torch.tensor(rate * 32).ceil())
    expected = set(range(8)) | set(range(64 - (keep - 8), 64))
    grown = set(new0.flatten().nonzero().flatten().tolist()) - expected
    assert expected <= set(new0.flatten().nonzero().flatten().tolist())
    assert len(grown) == 32 - keep  # gradient growth regrows exactly the removed count (all-zero grads)


# ------------------------------------------------------------------------------------------- SLaK
def test_slak_only_large_kernel_masks_strips_only_and_keeps_exact_density():
    torch.manual_seed(0)
    model = ToyNet("strip")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masking = Masking(model, SparseConfig(mode="slak", sparsity=0.4, init="uniform", growth="gradient",
                                          update_every=3, total_steps=30), optimizer=opt)
    masking.init()
    assert set(masking.masks) == {f"block{i}.{d}.weight" for i in (1, 2) for d in ("horizontal", "vertical")}
    start = {n: int(m.sum()) for n, m in masking.masks.items()}
    before = {n: m.clone() for n, m in masking.masks.items()}
    train(model, masking, opt, batches(12), on_step=lambda mk, _: assert_masked_weights_zero(mk))
    assert masking.updates == 4
    assert {n: int(m.sum()) for n, m in masking.masks.items()} == start  # gradient growth: exact counts
    assert any(not torch.equal(before[n], masking.masks[n]) for n in start)  # the pattern did move
    assert all(s["density"] == pytest.approx(0.6, abs=0.1) for s in masking.stats())


def test_slak_all_layers_erk_and_momentum_growth():
    torch.manual_seed(0)
    model = ToyNet("strip")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = SparseConfig(mode="slak", sparsity=0.5, init="erk", growth="momentum", only_large_kernel=False,
                       update_every=2, total_steps=20)
    masking = Masking(model, cfg, optimizer=opt)
    masking.init()
    masked_or_dense = {s["name"] for s in masking.stats()}
    assert masked_or_dense == {n for n, p in model.named_parameters() if p.dim() in (2, 4)}
    assert masking.overall_density() == pytest.approx(0.5, abs=0.05)
    start = {n: int(m.sum()) for n, m in masking.masks.items()}
    train(model, masking, opt, batches(6))
    assert {n: int(m.sum()) for n, m in masking.masks.items()} == start
    assert_masked_weights_zero(masking)


# ------------------------------------------------------------------------------------ resume / AMP
def test_resume_is_bit_identical():
    data = batches(16, seed=3)
    model, opt, masking = make_sw(update_every=3, sync_gap=2)
    masking.init(data[0])
    train(model, masking, opt, data[:7])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "masking": masking.state_dict()}, buf)
    train(model, masking, opt, data[7:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, masking2 = make_sw(seed=123, update_every=3, sync_gap=2)  # different init, same config
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    masking2.load_state_dict(ckpt["masking"])
    assert masking2.steps == 7 and masking2.updates == 2 and masking2.syncs == 1
    train(model2, masking2, opt2, data[7:])

    assert masking2.steps == masking.steps == 16 and masking2.syncs == masking.syncs
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert masks_equal(masking, masking2)

    # the generator state is part of what makes this work: a resume without it diverges
    model3, opt3, masking3 = make_sw(seed=5, update_every=3, sync_gap=2)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    sd = dict(ckpt["masking"])
    sd["rng_state"] = torch.Generator().manual_seed(99).get_state()
    masking3.load_state_dict(sd)
    train(model3, masking3, opt3, data[7:])
    assert not masks_equal(masking, masking3)


def masks_equal(a: Masking, b: Masking) -> bool:
    return a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_masks_applied_under_amp_with_gradscaler():
    model, opt, masking = make_sw(update_every=2)
    masking.init(batches(1, seed=4)[0])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    seen = []
    train(model, masking, opt, batches(6), scaler=scaler, amp=True,
          on_step=lambda mk, upd: (assert_masked_weights_zero(mk), seen.append(upd)))
    assert masking.steps == 6 and masking.updates == 3 and seen.count(True) == 3

    # a step the scaler skips (inf gradients): masks still applied, counters do not advance
    w = model.block1.branches[0].weight
    x, y = batches(1, seed=8)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    with torch.no_grad():
        w.add_(1.0)  # pretend something touched the weights: the mask must zero them again
    stepped = scaler_step(scaler, opt)
    assert stepped is False
    assert masking.step(stepped) is False
    assert masking.steps == 6
    assert_masked_weights_zero(masking)


# ------------------------------------------------------------------------------- stats and export
def test_stats_and_sparsity_report_on_hand_made_mask():
    model, opt, masking = make_sw(init="uniform", update_every=0, sparsity=0.5)
    masking.init()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    m0 = torch.zeros(64, 1, 1, 1, dtype=torch.bool)
    m0[:10] = True
    m1 = torch.zeros(64, 1, 1, 1, dtype=torch.bool)
    m1[5:25] = True
    masking.masks["block1.branches.0.weight"], masking.masks["block1.branches.1.weight"] = m0, m1
    masking.apply_masks()
    st = {s["name"]: s for s in masking.stats()}
    s0, s1 = st["block1.branches.0.weight"], st["block1.branches.1.weight"]
    assert (s0["units"], s0["active_units"], s0["numel"], s0["nonzero"]) == (64, 10, 576, 90)
    assert s0["density"] == pytest.approx(10 / 64) and s0["sparsity"] == pytest.approx(54 / 64)
    assert s0["weight_nonzero"] == 90 and s1["nonzero"] == 180 and s1["layer"] == "block1"

    dense = export_dense(model, masking)
    assert not hasattr(dense, "masks") and type(dense) is ToyNet
    rows = {(r["name"], r["kind"]): r for r in sparsity_report(dense)}
    r0 = rows[("block1.branches.0.weight", "weight")]
    assert (r0["nonzero"], r0["numel"], r0["nonzero_filters"], r0["filters"]) == (90, 576, 10, 64)
    merged = rows[("block1", "shiftwise_merged")]
    assert merged["nonzero_filters"] == 25 and merged["filter_sparsity"] == pytest.approx(39 / 64)
    assert rows[("stem.weight", "weight")]["sparsity"] == 0.0
    only = sparsity_report(dense, masking)
    assert {r["name"] for r in only if r["kind"] == "weight"} == set(st)
    assert "total (weights)" in format_report(only)

    baked = bake_masks(model.state_dict(), masking.state_dict())
    assert torch.equal(baked["block1.branches.1.weight"], dense.block1.branches[1].weight)
    with pytest.raises(KeyError, match="missing"):
        bake_masks({}, masking.state_dict())


def test_export_dense_bakes_masks_and_matches_forward():
    model, opt, masking = make_sw(init="uniform", update_every=0)
    masking.init()
    with torch.no_grad():
        model.block2.branches[0].weight.add_(0.5)  # un-masked values: export must re-zero them
    dense = export_dense(model, masking).eval()
    masking.apply_masks()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dense(x), model.eval()(x), rtol=0, atol=0)
    assert dense.block2.branches[0].weight is not model.block2.branches[0].weight


# ------------------------------------------------------------------------------------------- errors
def test_bad_config_and_usage_errors():
    with pytest.raises(ValueError, match="mode"):
        SparseConfig(mode="dense")
    with pytest.raises(ValueError, match="per-filter rules"):
        SparseConfig(mode="slak", prune="magnitude_sum", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        SparseConfig(update_every=100)
    with pytest.raises(ValueError, match="sparsity"):
        SparseConfig(sparsity=1.0, total_steps=1)
    with pytest.raises(ValueError, match="unknown keys"):
        SparseConfig.from_dict({"mode": "slak", "gap": 3})
    with pytest.raises(ValueError, match="no ShiftWise layer"):
        Masking(ToyNet("strip"), sw_cfg())
    with pytest.raises(ValueError, match="no large-kernel strip"):
        Masking(ToyNet("sw"), SparseConfig(mode="slak", total_steps=10))
    model, opt, masking = make_sw()
    with pytest.raises(RuntimeError, match="init"):
        masking.step()
    with pytest.raises(ValueError, match="sample_batch"):
        masking.init()
    masking.init(batches(1)[0])
    sd = masking.state_dict()
    other = Masking(ToyNet("sw", c=4), sw_cfg())
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)
    bad = dict(sd, masks={"nope.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="nope.weight"):
        Masking(ToyNet("sw"), sw_cfg()).load_state_dict(bad)
    with pytest.raises(ValueError, match="mode"):
        Masking(ToyNet("sw"), sw_cfg()).load_state_dict(dict(sd, config=dict(sd["config"], mode="slak")))


def test_snip_has_no_side_effects():
    model, opt, masking = make_sw()
    bn = {k: v.clone() for k, v in model.norm.state_dict().items()}
    rng = torch.get_rng_state()
    masking.init(batches(1)[0])
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(bn[k], v) for k, v in model.norm.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_static_masks_from_weights():
    model, opt, _ = make_sw()
    with torch.no_grad():
        model.block1.branches[1].weight[::2] = 0
    masking = Masking(model, sw_cfg(init="from_weights", update_every=0))
    masking.init()
    assert masking.masks["block1.branches.1.weight"].flatten().tolist() == [i % 2 == 1 for i in range(64)]
    assert bool(masking.masks["block1.branches.0.weight"].all())
    train(model, masking, opt, batches(3))
    assert masking.updates == 0
    assert torch.all(model.block1.branches[1].weight[::2] == 0)


# ------------------------------------------------------------------------------------ integration
def test_integration_sw_nano():
    import lkvision

    torch.manual_seed(0)
    model = lkvision.create_model("sw_nano", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    masking = Masking(model, SparseConfig(mode="sw_coarse", update_every=1, sync_gap=2, total_steps=10),
                      optimizer=opt)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    masking.init((x, y))
    assert masking.masks, "no ShiftWise branch was masked"
    assert all(m.shape[1:] == (1, 1, 1) for m in masking.masks.values())
    train(model, masking, opt, [(x, y)] * 2)
    assert masking.updates == 2 and masking.syncs == 1
    assert_masked_weights_zero(masking)


def test_real_strip_conv_layer_is_found():
    from lkvision.layers import StripConv

    model = nn.Sequential(nn.Conv2d(3, 4, 3), StripConv(4, 7, 3), nn.Conv2d(4, 4, 5))
    masking = Masking(model, SparseConfig(mode="slak", init="uniform", update_every=0))
    masking.init()
    shapes = sorted(tuple(model.get_parameter(n).shape[-2:]) for n in masking.masks)
    assert shapes == [(3, 7), (7, 3)]  # the two strips; the small 3x3 branch and plain convs stay dense
