"""Smoke test of experiments/finetune_cpu.py --quick: every method runs through the
library's training loop at (nearly) equal compute and every output is written. Nothing is
downloaded: the tiny base model and classifiers are trained in a temporary cache."""
import importlib
import json
import math
import os
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    sys.path.insert(0, ROOT)
    return importlib.import_module("experiments.finetune_cpu")


def test_quick_run_writes_every_output(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load()
    out, cache = tmp_path / "out", tmp_path / "cache"
    summary = mod.main(["--quick", "--out", str(out), "--cache", str(cache)])
    for name in ("finetune_reward_vs_compute.png", "finetune_diversity_vs_reward.png", "finetune_samples.png",
                 "finetune_table.md", "finetune_results.json"):
        assert (out / name).stat().st_size > 0, name
    cfg = mod.QUICK
    table = summary["table"]
    assert set(table) == set(cfg.methods)
    runs = summary["runs"]
    assert len(runs) == len(cfg.methods) * len(cfg.seeds)
    # each method's rate was swept on its own seed, and the chosen one is used for every seed
    assert len(summary["sweep"]) == len(cfg.methods) * len(cfg.lrs)
    assert all(r["seed"] == cfg.sweep_seed for r in summary["sweep"])
    assert all(r["lr"] == summary["chosen_lr"][r["method"]] for r in runs)
    for r in runs:
        used = r["forward"] + r["backward"]
        # every run spends the budget, overshooting by at most its last step
        # (at most 2T forward + T backward evaluations per sample in a batch)
        assert cfg.budget <= used <= cfg.budget + 3 * cfg.T * cfg.batch, (r["method"], used)
        assert all(math.isfinite(p["reward"]) and 0 <= p["reward"] <= 1 for p in r["curve"])
    # the cost model decides which roles carry variance
    gv = {k: v["grad_var"] for k, v in table.items()}
    assert gv["zeroth_order"]["FO"] == 0 and gv["zeroth_order"]["HO"] == 0 and gv["zeroth_order"]["ZO"] > 0
    assert gv["reinforce"]["HO"] > 0 and gv["reinforce"]["FO"] == 0 and gv["reinforce"]["ZO"] == 0
    assert gv["full"]["HO"] == 0 and gv["full"]["ZO"] == 0
    # mirrored parameter noise cancels most of the ZO variance; pairs mirror only what they say
    assert gv["zeroth_order_paired"]["ZO"] < gv["zeroth_order"]["ZO"] / 10
    assert gv["reinforce_paired"]["HO"] > 0 and gv["reinforce_paired"]["ZO"] == 0
    assert {r["pairing"] for r in runs if r["method"].endswith("_paired")} <= {"param", "ho"}
    # only plans with backward passes store activations; ZO stores none
    assert table["zeroth_order"]["activation_mb"] == 0
    assert table["draft1"]["activation_mb"] > 0
    md = (out / "finetune_table.md").read_text()
    assert all(f"| {m} |" in md for m in cfg.methods)
    with open(out / "finetune_results.json") as fh:
        assert json.load(fh)["config"]["budget"] == cfg.budget


def test_weights_cache_is_reused(tmp_path):
    _load()
    from experiments.shapes.pretrain import PretrainConfig, pretrained_unet

    cfg = PretrainConfig(channels=(16, 32), steps=2, batch=4)
    a = pretrained_unet(cfg, tmp_path, progress=False)
    files = os.listdir(tmp_path)
    assert files == [f"unet-{cfg.key()}.safetensors"]
    b = pretrained_unet(cfg, tmp_path, progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and va.equal(vb)
    assert PretrainConfig(channels=(16, 32), steps=3, batch=4).key() != cfg.key()
