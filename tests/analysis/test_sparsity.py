import pytest
import torch
from torch import nn

from lkvision.analysis.sparsity import pruned_filters, sparsity_report


class _FakeSW(nn.Module):
    def __init__(self, R: int, nk: int, branches: int = 2):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(R, R * nk, 3, groups=R, bias=False) for _ in range(branches))
        self.register_buffer("idx_identit", torch.zeros(R, 1, dtype=torch.int32))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(_FakeSW(2, 3)), nn.Sequential(_FakeSW(1, 2), _FakeSW(1, 2))])


def _hand_made():
    net = _Net()
    masks = {}
    # stage 0: R=2, nk=3. branch 0 prunes filters {0, 4}, branch 1 prunes {0, 4, 5}: merged {0, 4}
    m0 = torch.ones(6, 1, 1, 1)
    m0[[0, 4]] = 0
    m1 = torch.ones(6, 1, 1, 1)
    m1[[0, 4, 5]] = 0
    masks["stages.0.0.branches.0.weight"], masks["stages.0.0.branches.1.weight"] = m0, m1
    # stage 1, layer a: R=1, nk=2, both branches prune filter 1; layer b: nothing pruned (zeros only in b1)
    ma = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    masks["stages.1.0.branches.0.weight"] = masks["stages.1.0.branches.1.weight"] = ma
    with torch.no_grad():
        net.stages[1][1].branches[1].weight.zero_()
    return net, masks


def test_sparsity_of_hand_made_masks():
    net, masks = _hand_made()
    rep = sparsity_report(net, masks=masks)
    assert [lay.name for lay in rep.layers] == ["stages.0.0", "stages.1.0", "stages.1.1"]
    s0, a, b = rep.layers
    assert (s0.stage, s0.groups, s0.nk, s0.pruned) == (0, 2, 3, 2)
    assert s0.sparsity == pytest.approx(2 / 6) and s0.branch_sparsity == pytest.approx([2 / 6, 3 / 6])
    assert s0.pruned_per_index == [1, 1, 0]  # filter 0 of group 0, filter 1 (=4-3) of group 1
    assert s0.groups_by_pruned_count == [0, 2, 0, 0]
    assert a.sparsity == 0.5 and b.sparsity == 0.0 and b.branch_sparsity == [0.0, 1.0]
    assert rep.index_distribution == {0: [0.5, 0.5, 0.0], 1: [0.0, 0.5]}
    assert rep.count_distribution == {0: [0.0, 1.0, 0.0, 0.0], 1: [0.5, 0.5, 0.0]}
    assert rep.overall == pytest.approx(3 / 10)


def test_sparsity_from_zeros_in_a_state_dict_matches_masks():
    net, masks = _hand_made()
    with torch.no_grad():
        for name, m in masks.items():
            dict(net.named_parameters())[name].mul_(m)
    rep_w = sparsity_report(net.state_dict())
    rep_m = sparsity_report(net, masks=masks)
    assert rep_w.rows() == rep_m.rows()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("idx_identit")}
    with pytest.raises(ValueError, match="nk"):
        sparsity_report(sd)
    assert sparsity_report(sd, nk={"stages.0.0": 3, "stages.1.0": 2, "stages.1.1": 2}).rows() == rep_w.rows()
    with pytest.raises(ValueError, match="no Shiftwise layers"):
        sparsity_report({"a.weight": torch.ones(2, 2)})
    assert pruned_filters(torch.tensor([[0.0, 0.0], [0.0, 1.0]]).view(2, 1, 1, 2)).tolist() == [True, False]


def test_sparsity_cli_on_a_sparse_checkpoint(tmp_path):
    import lkvision
    from lkvision.cli import main

    from ._tiny import kwargs_arg, tiny_sw

    name, kw = tiny_sw()
    model = lkvision.create_model(name, **kw)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "branches") and hasattr(m, "idx_identit"):
                for br in m.branches:
                    br.weight[::3] = 0  # every third filter pruned in every branch
                n += 1
    assert n > 0
    ckpt = tmp_path / "sparse.safetensors"
    lkvision.save_weights(model, ckpt)
    rc = main(["sparsity", "--checkpoint", str(ckpt), "--model", name, *kwargs_arg(kw), "--out-dir", str(tmp_path)])
    assert rc == 0
    for f in ("sparsity.png", "sparsity_layers.csv", "sparsity_distributions.csv", "sparsity.json"):
        assert (tmp_path / f).stat().st_size > 0
    rep = sparsity_report(model)
    assert all(abs(lay.sparsity - len(range(0, lay.filters, 3)) / lay.filters) < 1e-9 for lay in rep.layers)
