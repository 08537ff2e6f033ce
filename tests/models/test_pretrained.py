"""Pretrained weights the timm way: ``pretrained=True`` from a (real, offline) Hugging Face Hub cache, official
files of the other families through ``pretrained=<path>`` / ``pretrained_cfg_overlay=dict(file=...)``, and the
loading rules (every backbone tensor required; head and removed parts may be dropped)."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lkvision
from conftest import GOLDEN, golden_meta, golden_tensors
from lkvision.compat import from_official
from lkvision.models import CheckpointError, save_weights

SRC = str(Path(lkvision.__file__).resolve().parents[1])
HUB_REPO = "DingXiaoH/UniRepLKNet"
HUB_FILE = "unireplknet_a_in1k_224_acc77.03.pth"  # the real cfg of unireplknet_a.in1k names this file


def _official(case: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in golden_tensors(case).items() if not (k.startswith("__") and k.endswith("__"))}


def _populate_hub_cache(cache: Path, repo_id: str, filename: str, payload: bytes) -> Path:
    """Write ``filename`` of ``repo_id`` into a Hugging Face cache with huggingface_hub's own layout
    (``models--org--name/{blobs,snapshots/<commit>,refs/main}``), as a download would leave it."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type=constants.REPO_TYPE_MODEL)
    commit = hashlib.sha1(payload).hexdigest()
    etag = hashlib.sha256(payload).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / etag).write_bytes(payload)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / filename).symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit / filename


def test_pretrained_true_downloads_from_the_hub_cache_and_converts(tmp_path):
    """``pretrained=True`` (lkvision and timm) goes through huggingface_hub (offline, from a populated cache),
    converts the official file and equals ``from_official`` on the same file (and the official logits)."""
    from huggingface_hub import scan_cache_dir

    ckpt = tmp_path / "official.pth"
    torch.save({"model": _official("unireplknet_dev")}, ckpt)  # the official release layout
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, HUB_REPO, HUB_FILE, ckpt.read_bytes())
    info = scan_cache_dir(cache)  # huggingface_hub reads the layout back
    assert [(r.repo_id, sorted(f.file_name for rev in r.revisions for f in rev.files)) for r in info.repos] == [
        (HUB_REPO, [HUB_FILE])]

    code = f"""
        import torch, lkvision, timm
        from safetensors.torch import load_file
        from lkvision.compat import from_official
        from lkvision.compat.unireplknet import official_to_model_kwargs
        from lkvision.models import CheckpointError
        official = {golden_meta("unireplknet_dev")["constructor"]["kwargs"]!r}
        kw = official_to_model_kwargs(**official)
        arch = dict(depths=kw["depths"], dims=kw["dims"], kernel_sizes=kw["kernel_sizes"])
        golden = load_file({str(GOLDEN / "unireplknet_dev.safetensors")!r})
        x = golden["__input__"]
        a = lkvision.create_model("unireplknet_a", pretrained=True, **arch).eval()
        b = timm.create_model("unireplknet_a.in1k", pretrained=True, **arch).eval()
        ref = from_official("unireplknet", {str(ckpt)!r}, **official).eval()
        with torch.no_grad():
            ya, yb, yr = a(x), b(x), ref(x)
        assert torch.equal(ya, yr) and torch.equal(yb, yr), "pretrained=True differs from from_official"
        assert (ya - golden["__output__"]).abs().max() < 1e-5, "does not reproduce the official logits"
        try:                                           # not in the cache and offline: a clear error
            lkvision.create_model("unireplknet_f", pretrained=True, device="meta")
        except CheckpointError as e:
            assert "unireplknet_f_in1k_224_acc78.58.pth" in str(e) and "pretrained=<path>" in str(e), e
        else:
            raise AssertionError("no error without the file")
        print("ok")
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# family -> (golden case, registered model the file is loaded into, official kwargs -> lkvision kwargs)
_FILE_CASES = {
    "shiftwise": ("sw_dev", "sw_tiny", "official_to_lkvision_kwargs"),
    "replknet": ("replknet_dev", "replknet_31b", "model_kwargs_from_official"),
    "slak": ("slak_dev", "slak_t", "official_to_model_kwargs"),
}


@pytest.mark.parametrize("family", sorted(_FILE_CASES))
def test_official_file_through_pretrained_path_lkvision_and_timm(family, tmp_path):
    """Weights hosted elsewhere (Google Drive, ...): the downloaded official file loads with ``pretrained=path``
    and with timm's ``pretrained_cfg_overlay=dict(file=...)``, converted on the fly, equal to from_official."""
    import importlib

    import timm

    case, name, translate = _FILE_CASES[family]
    official = golden_meta(case)["constructor"]["kwargs"]
    kw = getattr(importlib.import_module(f"lkvision.compat.{family}"), translate)(**official)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": _official(case), "epoch": 299}, path)
    ref = from_official(family, str(path), **official).eval()
    a = lkvision.create_model(name, pretrained=str(path), **kw).eval()
    b = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    x = golden_tensors(case)["__input__"]
    with torch.no_grad():
        yr = ref(x)
        assert torch.equal(a(x), yr) and torch.equal(b(x), yr)


def _unirep_test_file(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = lkvision.create_model("unireplknet_test").eval()
    return model, save_weights(model, tmp_path / "w.safetensors")


def test_features_only_pretrained_loads_backbone_and_lists_head_keys(tmp_path, caplog):
    model, path = _unirep_test_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="lkvision.pretrained"):
        feats = lkvision.create_model("unireplknet_test", features_only=True, out_indices=(1, 2), pretrained=path)
    own = feats.state_dict()
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items() if k in own)
    assert not [k for k in own if k.startswith("stages.3")]  # pruned after the last output
    msg = caplog.text
    assert "head.weight" in msg and "stages.3.0" in msg and "feature_norms.1.weight" in msg  # listed at info


def test_features_only_pretrained_requires_every_backbone_tensor(tmp_path):
    model, _ = _unirep_test_file(tmp_path)
    sd = dict(model.state_dict())
    broken = {k: v for k, v in sd.items() if k != "stages.1.0.fc1.weight"}
    save_weights(broken, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"backbone tensors missing.*stages\.1\.0\.fc1\.weight"):
        lkvision.create_model("unireplknet_test", features_only=True, pretrained=tmp_path / "missing.safetensors")
    save_weights({"encoder.layer.0.weight": torch.zeros(3)}, tmp_path / "nomatch.safetensors")
    with pytest.raises(CheckpointError, match="backbone tensors missing"):
        lkvision.create_model("unireplknet_test", features_only=True, pretrained=tmp_path / "nomatch.safetensors")
    save_weights({**sd, "stages.0.0.extra.weight": torch.zeros(3)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*stages\.0\.0\.extra\.weight"):
        lkvision.create_model("unireplknet_test", features_only=True, pretrained=tmp_path / "extra.safetensors")


def test_new_num_classes_and_in_chans_adapt_the_pretrained_weights(tmp_path):
    model, path = _unirep_test_file(tmp_path)
    m = lkvision.create_model("unireplknet_test", pretrained=path, num_classes=5, in_chans=1)
    w = model.state_dict()["stem.0.weight"]
    torch.testing.assert_close(m.stem[0].weight, w.sum(1, keepdim=True))
    assert torch.equal(m.stages[2][1].fc1.weight, model.stages[2][1].fc1.weight)
    assert m.head.weight.shape == (5, 64)  # new classifier at its init


def test_official_downstream_checkpoint_backbone_and_norms(tmp_path):
    """An mmseg/mmdet checkpoint (``state_dict`` with ``backbone.*``, the official ``norm0..3`` and a decoder)
    loads into the features_only model: backbone converted, the norms into the per-output norms."""
    official = golden_meta("unireplknet_dev")["constructor"]["kwargs"]
    sd = {f"backbone.{k}": v for k, v in _official("unireplknet_dev").items() if not k.startswith(("head.", "norm."))}
    g = torch.Generator().manual_seed(0)
    norms = {f"backbone.norm{i}.{p}": torch.rand(c, generator=g)
             for i, c in enumerate(official["dims"]) for p in ("weight", "bias")}
    path = tmp_path / "upernet.pth"
    torch.save({"meta": {"iter": 160000}, "state_dict": {**sd, **norms, "decode_head.conv_seg.weight": torch.ones(2)}},
               path)
    kw = dict(depths=official["depths"], dims=official["dims"], kernel_sizes=official["kernel_sizes"])
    m = lkvision.create_model("unireplknet_t", pretrained=path, features_only=True, **kw)
    assert torch.equal(m.feature_norms["2"].weight, norms["backbone.norm2.weight"])
    ref = from_official("unireplknet", _official("unireplknet_dev"), **official)
    assert torch.equal(m.stages[3][0].fc1.weight, ref.stages[3][0].fc1.weight)
