"""Training engine: bundled run, exact resume, 2-process DDP equivalence, CLI, recipes, bad inputs, sparse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lkvision.models import CheckpointError
from lkvision.ops import autoselect
from lkvision.train import ConfigError, make_config, train
from lkvision.train.checkpoint import find_latest, load_checkpoint
from lkvision.train.cli import eval_main, train_main
from lkvision.train.config import list_recipes, load_recipe, parse_set
from lkvision.train.optim import lr_at, param_groups

from ._tiny import TINY, TINY_WIDE, TinyTrainNet, quick_cfg, weights_of


# --------------------------------------------------------------------------------------------- recipes
def test_every_recipe_loads_and_paper_values():
    names = list_recipes()
    for r in ("default", "sw_tiny_in1k", "sw_small_in1k", "replknet_31b_in1k", "unireplknet_t_in1k",
              "slak_t_in1k"):
        assert r in names
    for r in names:
        make_config(r)
    sw = make_config("sw_tiny_in1k")
    assert (sw.lr, sw.lr_base_batch, sw.weight_decay, sw.warmup_epochs, sw.epochs) == (4e-3, 4096, 0.05, 5, 300)
    assert (sw.batch_size * sw.update_freq * 8, sw.drop_path, sw.ema, sw.aa) == (4096, 0.2, False,
                                                                               "rand-m9-mstd0.5-inc1")
    assert (sw.mixup, sw.cutmix, sw.smoothing, sw.reprob, sw.remode) == (0.8, 1.0, 0.1, 0.25, "pixel")
    assert sw.sparse["enabled"] and sw.sparse["sparsity"] == 0.3 and sw.sparse["sync_gap"] == 131
    rep = make_config("replknet_31b_in1k")
    assert (rep.epochs, rep.warmup_epochs, rep.drop_path, rep.batch_size * rep.update_freq * 8) == (120, 10, 0.3,
                                                                                                 2048)
    assert make_config("replknet_31b_ft384").layer_decay == 0.7


def test_unknown_recipe_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: default\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="'learning_rate'"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match="'wieght_decay'.*weight_decay"):
        parse_set(["wieght_decay=0.1"])
    with pytest.raises(ConfigError, match="'epochs'"):
        make_config("default", {"epochs": "many"})
    assert train_main(["--recipe", str(bad)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert train_main(["--set", "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err
    assert train_main(["--recipe", "no_such_recipe"]) == 2
    assert "no_such_recipe" in capsys.readouterr().err


def test_help_documents_keys_and_print_config(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    for key in ("update_freq", "layer_decay", "sparse", "clip_grad", "amp", "sw_tiny_in1k", "torchrun"):
        assert key in out
    assert train_main(["--print-config", "--epochs", "3", "--set", "sparse.sparsity=0.5"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "sparsity: 0.5" in out


# ------------------------------------------------------------------------------------------- optimizer
def test_param_groups_no_decay_and_layer_decay():
    model = TinyTrainNet()
    groups = param_groups(model, 0.05)
    for g in groups:
        for n, p in zip(g["param_names"], g["params"]):
            assert g["weight_decay"] == (0.0 if (p.ndim <= 1 or n.endswith(".bias")) else 0.05)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["head.weight"] == 1.0 and scale["stage1.0.dw.weight"] == 0.5
    assert scale["down.weight"] == 0.25 == scale["stage0.0.dw.weight"] and scale["stem.weight"] == 0.125
    assert lr_at(0, 1.0, 100, 10) == 0.0 and lr_at(5, 1.0, 100, 10) == 0.5 and lr_at(10, 1.0, 100, 10) == 1.0
    assert lr_at(55, 1.0, 100, 10, min_lr=0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 100, 10, min_lr=0.1) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------- bundled training
def test_two_epoch_bundled_run_learns_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = quick_cfg(out, train_subset=1000, val_subset=300, bundled_distractors=0, batch_size=16, lr=1e-2, epochs=2,
               plot=True, reparam_check=True)
    s = train(cfg)
    rows = json.loads((out / "metrics.json").read_text())["epochs"]
    # stated accuracy: chance is 10%; this 0.03 M-param net reaches 64.7% top-1 after 2 epochs (seed 0)
    assert s["final"]["val_top1"] >= 45.0, s
    assert rows[1]["train_loss"] < rows[0]["train_loss"] < 2.30
    steps = s["steps"]
    assert steps == 2 * (1000 // 16)
    for f in ("metrics.csv", "metrics.json", "curves.png", "final.safetensors", "best.safetensors",
              "deploy.safetensors", "log.txt", f"ckpt-{steps:08d}.safetensors", f"ckpt-{steps:08d}.state.pt"):
        assert (out / f).is_file(), f
    assert s["deploy"]["parity_ok"] and s["deploy"]["top1"] == pytest.approx(s["final"]["val_top1"])
    capsys.readouterr()
    # lkvision eval on the checkpoint (model and data settings come from its recipe)
    assert eval_main(["--checkpoint", str(out / f"ckpt-{steps:08d}.state.pt"), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["top1"] == pytest.approx(s["final"]["val_top1"]) and res["images"] == 300 and res["img_per_s"] > 0
    # --dtype bf16: weights and inputs in bf16; the accuracy stays within a few points of fp32
    assert eval_main(["--checkpoint", str(out / f"ckpt-{steps:08d}.state.pt"), "--no-progress", "--dtype", "bf16"]) == 0
    res_bf16 = json.loads(capsys.readouterr().out)
    assert res_bf16["dtype"] == "bf16" and abs(res_bf16["top1"] - res["top1"]) <= 3.0, (res_bf16, res)
    assert eval_main(["--checkpoint", str(out / "deploy.safetensors"), "--model", TINY, "--deploy",
                      "--set", "input_size=32", "--set", "bundled_distractors=0", "--subset", "300",
                      "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(s["final"]["val_top1"])
    # a checkpoint of another model: the error names the mismatched keys
    assert eval_main(["--checkpoint", str(out / "final.safetensors"), "--model", TINY_WIDE,
                      "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "stage1.0.dw.bias" in err
    # resuming it as another model: the checkpoint is not a candidate, and the error says why
    with pytest.raises(CheckpointError, match="different run configuration.*model: checkpoint 'lkv_test_tiny_train'"):
        train(quick_cfg(out, model=TINY_WIDE, batch_size=16, train_subset=1000, val_subset=300, resume="auto"))


# ------------------------------------------------------------------------------------------ exact resume
def test_resume_mid_epoch_is_bit_exact(tmp_path):
    kw = dict(drop_path=0.2, mixup=0.8, cutmix=1.0, ema=True, ema_decay=0.9, save_every_steps=3, keep_last=10,
              clip_grad=1.0)
    straight = train(quick_cfg(tmp_path / "a", **kw))
    n = straight["steps"]
    assert n == 16
    # a kernel choice measured in the run (this tiny model uses no measured op; an entry like the ops make)
    autoselect.choose("test_op", (1, "x"), {"a": int, "b": int}, "a", timer=lambda fn, cuda: {int: 1.0}[fn])
    stopped = train(quick_cfg(tmp_path / "b", max_steps=5, **kw))  # "killed" mid-epoch 0 after step 5
    assert stopped["stopped_early"] and stopped["steps"] == 5
    assert find_latest(tmp_path / "b").name == "ckpt-00000005.state.pt"
    # the kernel choices measured before the "kill" are in the run directory and the resumed run starts from them
    saved = json.loads((tmp_path / "b" / "autoselect.json").read_text())["entries"]
    assert any(e["op"] == "test_op" for e in saved)
    autoselect.clear_cache()
    resumed = train(quick_cfg(tmp_path / "b", resume="auto", **kw))
    table = autoselect.cache_table()
    assert all(table[(e["op"], autoselect._tuplify(e["key"]))]["winner"] == e["winner"] for e in saved)
    autoselect.clear_cache()
    assert resumed["steps"] == n
    wa, wb = weights_of(tmp_path / "a" / "final.safetensors"), weights_of(tmp_path / "b" / "final.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    _, sa = load_checkpoint(tmp_path / "a" / f"ckpt-{n:08d}.state.pt")
    _, sb = load_checkpoint(tmp_path / "b" / f"ckpt-{n:08d}.state.pt")
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    ea = sa["optimizer"]["state"]
    assert all(torch.equal(ea[i]["exp_avg_sq"], sb["optimizer"]["state"][i]["exp_avg_sq"]) for i in ea)
    assert sa["history"]["epochs"] == [{**r, "epoch_time_s": a["epoch_time_s"]} for r, a in
                                       zip(sb["history"]["epochs"], sa["history"]["epochs"])]
    # resuming from an explicit older mid-epoch checkpoint (step 3) also lands on the same weights
    c = tmp_path / "c"
    c.mkdir()
    for suffix in (".safetensors", ".state.pt"):
        os.link(tmp_path / "a" / f"ckpt-00000003{suffix}", c / f"ckpt-00000003{suffix}")
    train(quick_cfg(c, resume=str(c / "ckpt-00000003.state.pt"), **kw))
    wc = weights_of(c / "final.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


# ------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from lkvision.train.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = quick_cfg(out, batch_size=8, train_subset=128, val_subset=64, epochs=1, warmup_epochs=0.25)
        s = train(cfg, DistInfo(rank, world, rank, torch.device("cpu"), True, False))
        if rank == 0:
            Path(out, "summary.json").write_text(json.dumps(s))
        dist.barrier()  # both ranks done before the teardown (gloo aborted a rank that tore down early, rarely)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    single = train(quick_cfg(tmp_path / "one", batch_size=16, train_subset=128, val_subset=64, epochs=1,
                        warmup_epochs=0.25))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "two")), nprocs=2, join=True)
    multi = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert multi["world_size"] == 2 and multi["global_batch"] == 16 and multi["steps"] == single["steps"] == 8
    w1, w2 = weights_of(tmp_path / "one" / "final.safetensors"), weights_of(tmp_path / "two" / "final.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert multi["final"]["val_top1"] == pytest.approx(single["final"]["val_top1"], abs=1e-6)


# ----------------------------------------------------------------------------------- image-folder training
def test_folder_training_with_timm_pipeline_counts_corrupt_images(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 2)):
        for ci, cls in enumerate(("red", "blue")):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(36, 36, 3, generator=g) * 80).to(torch.uint8)
                px[..., 0 if ci == 0 else 2] += 170
                Image.fromarray(px.numpy()).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = quick_cfg(tmp_path / "run", data=str(tmp_path / "data"), model=TINY, batch_size=13, train_subset=None,
               val_subset=None, epochs=1, mixup=0.0, cutmix=0.0, input_size=32, aa="rand-m9-mstd0.5-inc1",
               reprob=0.25)
    with pytest.warns(UserWarning, match="broken.jpg"):
        s = train(cfg)
    assert s["skipped_images"] == 1 and s["steps"] == 1 and s["final"]["val_top1"] >= 0
    (tmp_path / "noval" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no 'val/' sub-folder"):
        train(quick_cfg(tmp_path / "x", data=str(tmp_path / "noval")))
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        train(quick_cfg(tmp_path / "x", data=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------------------- sparse training
def test_sparse_recipe_trains_and_masks_survive_resume(tmp_path):
    kw = dict(model="sw_femto", train_subset=64, val_subset=32, batch_size=16, epochs=2, warmup_epochs=0.5,
              sparse={"update_every": 2, "sync_gap": 2})
    cfg = make_config("default_sparse", {**quick_cfg(tmp_path / "a").to_dict(), **kw, "output": str(tmp_path / "a")})
    assert cfg.sparse["enabled"] and cfg.sparse["sparsity"] == 0.3
    straight = train(cfg)
    cfg_b = make_config("default_sparse", {**cfg.to_dict(), "output": str(tmp_path / "b"), "max_steps": 3})
    train(cfg_b)
    resumed = train(make_config("default_sparse", {**cfg_b.to_dict(), "max_steps": None, "resume": "auto"}))
    assert resumed["steps"] == straight["steps"] == 8
    _, sa = load_checkpoint(tmp_path / "a" / "ckpt-00000008.state.pt")
    _, sb = load_checkpoint(tmp_path / "b" / "ckpt-00000008.state.pt")
    ma, mb = sa["sparse"]["masks"], sb["sparse"]["masks"]
    assert ma and ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert sa["sparse"]["updates"] == sb["sparse"]["updates"] >= 3
    wa, wb = weights_of(tmp_path / "a" / "final.safetensors"), weights_of(tmp_path / "b" / "final.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not m.all() for m in ma.values())
    for k, m in ma.items():  # pruned filters are exact zeros in the saved weights
        assert (wa[k] * (~m)).abs().sum() == 0


# ------------------------------------------------------------------------------------- speed/memory options
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_accumulation_checkpointing_layer_decay_options_run(tmp_path, amp):
    cfg = quick_cfg(tmp_path, amp=amp, channels_last=True, grad_checkpointing=True, update_freq=2, layer_decay=0.7,
               clip_grad=0.5, ema=True, batch_size=16, train_subset=64, val_subset=32, epochs=1, mixup=0.8,
               cutmix=1.0, reparam_check=True)
    s = train(cfg)
    assert s["steps"] == 2 and s["global_batch"] == 32
    assert torch.isfinite(torch.tensor(s["final"]["train_loss"]))
    _, st = load_checkpoint(tmp_path / "ckpt-00000002.state.pt")
    assert bool(st["scaler"]) == (amp == "fp16")
    scales = sorted({g["lr_scale"] for g in st["optimizer"]["param_groups"]})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.7 ** 3)


@pytest.mark.slow
def test_torch_compile_option(tmp_path):
    s = train(quick_cfg(tmp_path, compile=True, train_subset=64, val_subset=32, epochs=1))
    assert s["steps"] == 2


def test_eval_official_checkpoint_through_compat(tmp_path, capsys):
    import lkvision
    import lkvision.compat.shiftwise as compat_sw

    torch.manual_seed(0)
    model = lkvision.create_model("sw_femto", num_classes=10, in_chans=1).eval()
    lkvision.save_weights(model, tmp_path / "ours.safetensors")
    torch.save({"model": compat_sw.to_official(model), "epoch": 3}, tmp_path / "official.pth")
    common = ["--model", "sw_femto", "--subset", "40", "--no-progress", "--batch-size", "20"]
    assert eval_main(["--checkpoint", str(tmp_path / "ours.safetensors"), *common]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert eval_main(["--checkpoint", str(tmp_path / "official.pth"), "--family", "shiftwise", *common]) == 0
    official = json.loads(capsys.readouterr().out)
    assert official["images"] == ours["images"] == 40
    assert official["top1"] == ours["top1"] and official["loss"] == pytest.approx(ours["loss"], rel=1e-5)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from Linux /proc")
def test_destroy_process_group_frees_gloo_after_ddp(tmp_path):
    """After DDP, destroying the group stops gloo's threads: nothing keeps the group alive until interpreter exit
    (where tearing gloo down aborted a rank, rarely). Needs lkvision.train imported before the group exists."""
    import subprocess
    import sys
    import textwrap

    import lkvision

    code = textwrap.dedent(f"""
        import gc, os, torch, torch.distributed as dist
        from torch import nn
        import lkvision.train
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'pg'}", rank=0, world_size=1)
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
        ddp(torch.randn(2, 4)).sum().backward()
        del ddp
        dist.destroy_process_group()
        gc.collect()
        names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        assert not [n for n in names if "gloo" in n], names
    """)
    src = str(Path(lkvision.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_deterministic_runs_choose_no_kernel_by_timing(monkeypatch):
    from lkvision.train.engine import _no_timed_choices

    monkeypatch.setenv("LKVISION_AUTOSELECT", "1")
    with _no_timed_choices(True):
        assert os.environ["LKVISION_AUTOSELECT"] == "0"
    assert os.environ["LKVISION_AUTOSELECT"] == "1"
    monkeypatch.delenv("LKVISION_AUTOSELECT")
    with _no_timed_choices(True):
        assert os.environ["LKVISION_AUTOSELECT"] == "0"
    assert "LKVISION_AUTOSELECT" not in os.environ
    with _no_timed_choices(False):
        assert "LKVISION_AUTOSELECT" not in os.environ
