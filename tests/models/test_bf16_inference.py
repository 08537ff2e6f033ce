"""bf16 inference of every family's deploy form: the whole model cast to bf16 and fp32 weights under autocast
give logits within the documented tolerance (lkvision.bench.precision.BF16_TOLERANCE) of fp32, on lkvision's
CPU fast paths (oneDNN linears, channels_last depth-wise convs) in both layouts."""

from __future__ import annotations

import pytest
import torch

import lkvision
from conftest import family_test_models, randomize_bn_and_scales
from lkvision.bench.precision import BF16_TOLERANCE, relative_error

CASES = family_test_models()
IDS = [name for name, _ in CASES]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_bf16_deploy_within_tolerance(name, kw, channels_last):
    torch.manual_seed(0)
    model = randomize_bn_and_scales(lkvision.create_model(name, **{**kw, "num_classes": 10})).eval()
    deploy = lkvision.reparameterize(model)
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        deploy, x = deploy.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = deploy(x)
        with torch.autocast("cpu", torch.bfloat16):
            y_amp = deploy(x)
        y_bf16 = lkvision.reparameterize(deploy).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16 and y_amp.dtype == torch.bfloat16
    assert relative_error(y_bf16, ref) <= BF16_TOLERANCE
    assert relative_error(y_amp, ref) <= BF16_TOLERANCE


def test_relative_error_measure():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref + torch.tensor([0.0, 0.2, 0.0]), ref) == pytest.approx(0.05)
