"""lkvision.compat._common: the layout helpers every official-format converter shares."""

import torch

import lkvision
from lkvision.compat import _common
from lkvision.compat._common import downstream_out_indices, drop_pruned


def test_drop_pruned_is_the_filter_apply_state_dict_uses():
    from lkvision.models import _pretrained

    assert _common.drop_pruned is _pretrained.drop_pruned
    short = lkvision.create_model("sw_femto", features_only=True, out_indices=(0, 1), device="meta")
    full = lkvision.create_model("sw_femto", device="meta")
    sd = {"stem.0.weight": 0, "stages.1.0.fc1.weight": 1, "stages.2.0.fc1.weight": 2, "stages.3.0.fc1.weight": 3,
          "downsamples.2.0.weight": 4, "head.fc.weight": 5, "feature_norms.0.weight": 6}
    kept = drop_pruned(sd, short)
    assert set(kept) == {"stem.0.weight", "stages.1.0.fc1.weight", "feature_norms.0.weight"}, kept
    assert drop_pruned(sd, full) == sd and drop_pruned(sd, torch.nn.Linear(1, 1)) == sd


def test_downstream_out_indices():
    sd = {"norm1.weight": 0, "norm3.weight": 0, "norm3.bias": 0, "norm.weight": 0, "stages.0.0.gamma": 0}
    assert downstream_out_indices(sd, None) == (1, 3)  # the detected output norms
    assert downstream_out_indices(sd, [0, 2]) == (0, 2)  # explicit out_indices win
    assert downstream_out_indices({"norm.weight": 0}, None) is None  # a classifier checkpoint
    assert downstream_out_indices(None, None) is None and downstream_out_indices(None, (3,)) == (3,)


def test_slak_and_shiftwise_use_it():
    from lkvision.compat.shiftwise import official_to_lkvision_kwargs
    from lkvision.compat.slak import official_to_model_kwargs

    norms = {"norm0.weight": torch.ones(1), "norm2.weight": torch.ones(1)}
    for fn, seq in ((official_to_model_kwargs, tuple), (official_to_lkvision_kwargs, list)):
        kw = fn(norms)
        assert (kw["features_only"], kw["num_classes"], kw["out_indices"]) == (True, 0, seq((0, 2)))
        assert fn(norms, out_indices=[3])["out_indices"] == seq((3,))
        assert "features_only" not in fn({}) and "features_only" not in fn()
