"""lkvision.compat._common: the layout helpers every official-format converter shares."""

import torch

import lkvision
from lkvision.compat import _common
from lkvision.compat._common import drop_pruned


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
