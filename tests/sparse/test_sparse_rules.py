"""Pure functions of lkvision.sparse: schedules, prune/grow rules, layer densities."""

from __future__ import annotations

import math

import pytest
import torch

from lkvision.sparse import (
    cosine_prune_rate,
    densities_from_scores,
    erk_densities,
    is_sync_update,
    is_update_step,
    uniform_densities,
)
from lkvision.sparse.rules import (
    growth_signal,
    magnitude_prune,
    num_to_remove,
    random_growth,
    topk_growth,
    unit_scores,
)


def test_cosine_prune_rate_endpoints_and_midpoint():
    assert cosine_prune_rate(0, 100, 0.3, 0.005) == pytest.approx(0.3)
    assert cosine_prune_rate(50, 100, 0.3, 0.005) == pytest.approx((0.3 + 0.005) / 2)
    assert cosine_prune_rate(100, 100, 0.3, 0.005) == pytest.approx(0.005)
    assert cosine_prune_rate(250, 100, 0.3, 0.005) == pytest.approx(0.005)  # clamped, no rise
    assert cosine_prune_rate(25, 100, 0.3, 0.0) == pytest.approx(0.3 * (1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_prune_rate(1, 0, 0.3, 0.0)


def test_update_and_sync_steps():
    assert [s for s in range(1, 13) if is_update_step(s, 4)] == [4, 8, 12]
    assert not is_update_step(5, None) and not is_update_step(5, 0)
    # k = step // u; sync when k % gap == 0 -> updates 3, 6, 9 with u=2, gap=3 -> steps 6, 12, 18
    assert [s for s in range(2, 21, 2) if is_sync_update(s, 2, 3)] == [6, 12, 18]
    assert not any(is_sync_update(s, 2, None) for s in range(2, 21, 2))
    assert all(is_sync_update(s, 2, 1) for s in range(2, 21, 2))


def test_unit_scores_coarse_sums_each_filter():
    w = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2) - 3  # -3..4
    s = unit_scores(w, coarse=True)
    assert s.shape == (2, 1, 1, 1)
    assert s.flatten().tolist() == [3 + 2 + 1 + 0, 1 + 2 + 3 + 4]
    assert torch.equal(unit_scores(w, coarse=False), w.abs())


def test_magnitude_prune_keeps_top_of_active_and_prefers_active_on_ties():
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    score = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.0, 0.0])
    n = num_to_remove(0.3, int(mask.sum()))  # ceil(1.2) = 2
    assert n == 2
    assert magnitude_prune(mask, score, n).tolist() == [True, False, True, False, False, False]
    # ties at zero: a zero-valued active unit is kept before an inactive one
    mask2 = torch.tensor([0, 1, 0, 1], dtype=torch.bool)
    assert magnitude_prune(mask2, torch.zeros(4), 0).tolist() == [False, True, False, True]
    # sync-style score (branches summed): an inactive unit with a large score can be kept, count is exact
    mask3 = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    new = magnitude_prune(mask3, torch.tensor([0.1, 0.2, 5.0, 0.3]), 1)
    assert new.tolist() == [False, False, True, True]
    assert num_to_remove(1.0, 3) == 3 and num_to_remove(0.0, 3) == 0
    with pytest.raises(ValueError, match="score shape"):
        magnitude_prune(mask, torch.zeros(5), 1)


def test_random_growth_expected_count_and_only_adds():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(20000, dtype=torch.bool)
    mask[:10000] = True
    grown = random_growth(mask, 1000, g)
    assert bool(grown[:10000].all())
    added = int(grown.sum()) - 10000
    assert abs(added - 1000) < 4 * math.sqrt(1000)  # Binomial(10000, 0.1)
    assert torch.equal(random_growth(mask, 0, g), mask)


def test_topk_growth_picks_largest_inactive():
    mask = torch.tensor([1, 0, 0, 0, 1], dtype=torch.bool)
    score = torch.tensor([9.0, 0.2, 0.7, 0.5, 8.0])
    assert topk_growth(mask, score, 2).tolist() == [True, False, True, True, True]
    assert int(topk_growth(mask, score, 10).sum()) == 5


def test_growth_signal_errors_are_clear():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        growth_signal(p, "gradient", None, "w")
    with pytest.raises(RuntimeError, match="needs the optimizer"):
        growth_signal(p, "momentum", None, "w")
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        growth_signal(p, "momentum", opt, "w")


def test_uniform_and_erk_densities_meet_global_budget():
    assert uniform_densities(["a", "b"], 0.6) == {"a": 0.6, "b": 0.6}
    shapes = {"stem": (8, 3, 3, 3), "dw": (64, 1, 7, 3), "fc1": (256, 64), "fc2": (64, 256), "head": (10, 64)}
    d = erk_densities(shapes, 0.5)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    kept = sum(d[n] * numel[n] for n in shapes)
    assert kept == pytest.approx(0.5 * sum(numel.values()), rel=1e-9)
    assert all(0 < v <= 1 for v in d.values())
    assert d["stem"] == 1.0 and d["dw"] == 1.0  # small layers saturate and are made dense
    assert d["fc1"] == pytest.approx(d["fc2"])  # same (in + out) / (in * out)
    with pytest.raises(ValueError, match="density"):
        erk_densities(shapes, 0.0)


def test_densities_from_scores_global_threshold():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0, 0.5, 0.25])}
    d = densities_from_scores(scores, 0.5)  # k = 4 of 8 -> threshold 3.0 (strictly above): a {4}, b {5, 6}
    assert d == {"a": 0.25, "b": 0.5}
    d = densities_from_scores(scores, 0.375)  # k = 3 -> threshold 4.0
    assert d == {"a": 0.0, "b": 0.5}
    assert densities_from_scores(scores, 0.01) == {"a": 0.0, "b": 0.0}
    # ties at the threshold are all pruned: zero-saliency units never survive
    z = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([1.0, 2.0, 0.0, 0.0])}
    assert densities_from_scores(z, 0.75) == {"a": 0.0, "b": 0.5}


def test_prune_and_grow_match_a_stable_sort_reference_with_many_ties():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        n = int(torch.randint(5, 60, (1,), generator=g))
        mask = torch.rand(n, generator=g) < 0.6
        score = torch.randint(0, 4, (n,), generator=g).float()  # heavy ties
        num_remove = int(torch.randint(0, int(mask.sum()) + 1, (1,), generator=g))
        keep = int(mask.sum()) - num_remove
        ref_order = sorted(range(n), key=lambda i: (-score[i].item(), not mask[i].item(), i))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[ref_order[:keep]] = True
        assert torch.equal(magnitude_prune(mask, score, num_remove), ref)
        grow = int(torch.randint(0, n, (1,), generator=g))
        inactive = sorted((i for i in range(n) if not mask[i]), key=lambda i: (-score[i].item(), i))
        ref_grow = mask.clone()
        ref_grow[inactive[:grow]] = True
        assert torch.equal(topk_growth(mask, score, grow), ref_grow)
