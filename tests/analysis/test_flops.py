import json

import pytest
import torch
from torch import nn

from lkvision.analysis.flops import complexity, complexity_table

from ._tiny import kwargs_arg, tiny_sw


def test_complexity_of_a_hand_countable_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    c = complexity(model, resolution=16)
    macs = 8 * 3 * 9 * 16 * 16 + 8 * 16 * 16 * 10
    assert c["macs"] == macs and c["flops"] == 2 * macs
    assert c["params"] == 8 * 27 + 8 * 256 * 10 + 10
    with torch.no_grad():
        model[0].weight[:4] = 0
    assert complexity(model, 16)["nonzero_params"] == c["params"] - 4 * 27


def test_flops_table_train_vs_deploy_and_cli(tmp_path):
    from lkvision.cli import main

    name, kw = tiny_sw()
    rc = main(["flops", "--models", name, *kwargs_arg(kw), "--resolution", "32", "--out-dir", str(tmp_path)])
    assert rc == 0
    train, deploy = json.loads((tmp_path / "flops.json").read_text())["rows"]
    assert (train["form"], deploy["form"]) == ("train", "deploy")
    assert deploy["params_M"] != train["params_M"] and train["GFLOPs"] > 0 and deploy["GFLOPs"] > 0
    with pytest.raises(ValueError, match="unknown form"):
        complexity_table([name], 32, forms=("fused",), model_kwargs=kw)
