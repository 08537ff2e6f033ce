import pytest
import torch

from lkvision.analysis.coverage import coverage, coverage_from_tables, order_tables, use_counts


def test_coverage_hand_computed_small_case():
    # M=9, k=3: nk=3, offsets rp = [2, -1, -4]; H=W=4, e=1 -> conv maps 6x6. E=1, fixed order:
    # horizontal blocks hold filters (2, 1, 0), vertical (0, 1, 2), identity on filter 0.
    c = coverage(9, 4, 4, edges=1, shuffle=False)
    U = c["counts"][0]
    exp = torch.zeros(3, 6, 6, dtype=torch.int64)
    exp[0, 1:5, 4:6] += 1  # f0 horizontal, ph=-4: columns [4, 8) & [0, 6)
    exp[0, 0:2, 1:5] += 1  # f0 vertical, pv=2: rows [-2, 2) & [0, 6)
    exp[0, 1:5, 1:5] += 1  # identity
    exp[1, 1:5, 1:5] += 2  # f1: ph = pv = -1
    exp[2, 1:5, 0:2] += 1  # f2 horizontal, ph=2
    exp[2, 4:6, 1:5] += 1  # f2 vertical, pv=-4
    torch.testing.assert_close(U, exp)
    assert c["utilization"] == pytest.approx((24 + 16 + 15) / 108)
    assert c["mean_use"] == pytest.approx(80 / 108)


def test_fixed_order_does_not_grow_with_edges_and_shuffle_does():
    fixed = [coverage(47, 14, edges=E, shuffle=False)["utilization"] for E in (1, 2, 4, 8)]
    shuf = [coverage(47, 14, edges=E, shuffle=True, groups=4)["utilization"] for E in (1, 2, 4, 8)]
    assert max(fixed) == min(fixed)
    assert shuf == sorted(shuf) and shuf[-1] > fixed[0] + 0.3


def test_use_counts_equal_gradient_of_the_shift_add_op():
    from lkvision.ops.shift_add import make_shift_tables, num_blocks, shift_add

    M, R, E, H, W = 13, 3, 2, 7, 9
    nk = num_blocks(M, 3)
    pad_hv, ident = make_shift_tables(R, M, 3, edges=E)
    x = torch.zeros(1, R * nk, H + 2, W + 2, dtype=torch.float64, requires_grad=True)
    h, v, s = shift_add(x, pad_hv, ident, M, 3, impl="reference")
    (g,) = torch.autograd.grad(h.sum() + v.sum() + s.sum(), x)
    c = coverage_from_tables(pad_hv, ident, H, W)
    torch.testing.assert_close(c["counts"].reshape(R * nk, H + 2, W + 2).double(), g[0])


def test_coverage_errors():
    h, v, ident = order_tables(9, 1, False)
    with pytest.raises(ValueError, match="identity must be"):
        use_counts(h, v, ident[:, :0], 3, 4, 4)
    with pytest.raises(ValueError, match="outside its filters"):
        use_counts(h, v, ident + 5, 3, 4, 4)


def test_coverage_cli(tmp_path):
    from lkvision.cli import main

    rc = main(["coverage", "--M", "13", "9", "--sizes", "7", "5", "--edges", "1", "2", "--groups", "2",
               "--official-tables", "--out-dir", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "coverage.png").stat().st_size > 0
    text = (tmp_path / "coverage.csv").read_text()
    assert "official" in text and text.count("\n") == 1 + 2 * 2 * 2 + 2 * 2
