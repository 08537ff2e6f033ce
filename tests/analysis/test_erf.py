import math

import pytest
import torch
from torch import nn

from lkvision.analysis.erf import area_ratio, compute_erf, format_ratio, log_normalize

from ._tiny import kwargs_arg, tiny_sw


def _dw(k: int) -> nn.Conv2d:
    conv = nn.Conv2d(3, 3, k, padding=k // 2, groups=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(3, 1, k, k) + 0.1)  # positive: no tap removed by the ReLUs
    return conv


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_erf_of_one_depthwise_conv_is_its_kernel_footprint(variant):
    conv = _dw(5)
    imgs = [torch.rand(2, 3, 17, 19), torch.rand(1, 3, 17, 19)]  # positive inputs: central outputs > 0
    A = compute_erf(conv, imgs, variant=variant)
    expected = torch.zeros(17, 19, dtype=torch.float64)
    expected[8 - 2:8 + 3, 9 - 2:9 + 3] = conv.weight.detach().double()[:, 0].sum(0)
    scale = 3.0 if variant == "paper" else 1.0  # paper: sum over 3 images; code: mean
    torch.testing.assert_close(A, scale * expected)
    assert conv.weight.requires_grad and conv.training  # restored


def test_erf_code_variant_drops_negative_central_outputs():
    conv = _dw(3)
    with torch.no_grad():
        conv.weight[1].neg_()  # channel 1's central output is negative for positive images
    A_code = compute_erf(conv, [torch.rand(1, 3, 9, 9)], variant="code")
    A_paper = compute_erf(conv, [torch.rand(1, 3, 9, 9)], variant="paper")
    w = conv.weight.detach().double()[:, 0]
    torch.testing.assert_close(A_code[3:6, 3:6], w[0] + w[2])  # channel 1 removed by relu(output)
    torch.testing.assert_close(A_paper[3:6, 3:6], w[0] + w[2])  # channel 1 removed by relu(grad)


def test_erf_skips_nonfinite_images_and_checks_output():
    conv = _dw(3)
    bad = torch.rand(1, 3, 9, 9)
    bad[0, 0, 4, 4] = float("inf")
    A = compute_erf(nn.Sequential(conv, nn.Identity()), [torch.rand(1, 3, 9, 9), bad], variant="code")
    assert torch.isfinite(A).all()
    with pytest.raises(ValueError, match="4-D feature map"):
        compute_erf(nn.Flatten(), [torch.rand(1, 3, 9, 9)])
    with pytest.raises(ValueError, match="unknown ERF variant"):
        compute_erf(conv, [torch.rand(1, 3, 9, 9)], variant="abs")


def test_area_ratio_of_uniform_map_is_t_up_to_square_steps():
    H = 101
    A = torch.ones(H, H)
    for t in (0.2, 0.3, 0.5, 0.9):
        r = area_ratio(A, t)
        side = round(math.sqrt(r) * H)
        assert r > t
        assert ((side - 2) / H) ** 2 <= t  # the previous square (side - 2) did not reach t
    assert area_ratio(A, 0.99) <= 1.0
    assert area_ratio(torch.ones(64, 64), 0.99) == 1.0  # no inside square reaches it: the whole map
    assert area_ratio(A, 1.0) == math.inf and format_ratio(math.inf) == ">100%"
    assert area_ratio(torch.zeros(8, 8), 0.2) == math.inf


def test_area_ratio_of_peaked_map_and_log_normalize():
    A = torch.zeros(33, 33)
    A[16, 16] = 1.0
    assert area_ratio(A, 0.5) == pytest.approx(9 / 33**2)  # smallest square is side 3, as the official loop
    L = log_normalize(torch.tensor([[0.0, 9.0], [99.0, 999.0]]))
    torch.testing.assert_close(L, torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(H, W\) map"):
        area_ratio(torch.ones(2, 3, 3), 0.2)


def test_erf_of_registered_model_uses_forward_features():
    import lkvision

    name, kw = tiny_sw()
    model = lkvision.create_model(name, **kw)
    A = compute_erf(model, [torch.randn(1, 3, 64, 64)])
    assert A.shape == (64, 64) and (A >= 0).all() and A.sum() > 0


def test_erf_cli_end_to_end(tmp_path):
    from lkvision.cli import main

    name, kw = tiny_sw()
    rc = main(["erf", "--models", name, *kwargs_arg(kw), "--num-images", "2", "--resolution", "64",
               "--batch-size", "2", "--out-dir", str(tmp_path)])
    assert rc == 0
    for f in ("erf.png", "erf.csv", "erf.json", f"erf_{name}.npy"):
        assert (tmp_path / f).stat().st_size > 0
    assert "t=99%" in (tmp_path / "erf.csv").read_text()


def test_bundled_images_and_folder(tmp_path):
    from PIL import Image

    from lkvision.analysis.images import folder_image_paths, image_batches, sample_image_paths

    paths = sample_image_paths("skimage")
    assert len(paths) >= 10
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "b.jpg")
    fp = folder_image_paths(tmp_path)
    batches = list(image_batches(fp, 16, batch_size=2, num_images=3))
    assert [b.shape[0] for b in batches] == [2, 1] and batches[0].shape[1:] == (3, 16, 16)
    red = (1.0 - 0.485) / 0.229
    torch.testing.assert_close(batches[0][0, 0], torch.full((16, 16), red), atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="no images"):
        folder_image_paths(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        folder_image_paths(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
