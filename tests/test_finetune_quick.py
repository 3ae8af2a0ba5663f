"""Smoke test of experiments/finetune_cpu.py --quick: every method runs through the
library's training loop at (nearly) equal compute and every output is written. Nothing is
downloaded: the tiny base model and classifiers are trained in the cache of the run (runs/cache).
The run is the README's command, run once in the clone (``run_in_clone``), which
tests/test_readme_commands.py also checks; so is step_gradients.py's."""
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
CLONE_COMMANDS = [FINETUNE, STEP_GRADIENTS] = ["python experiments/finetune_cpu.py --quick",
                                               "python experiments/step_gradients.py --out runs/step-gradients --quick"]


def _load():
    sys.path.insert(0, ROOT)
    return importlib.import_module("experiments.finetune_cpu")


def test_quick_run_writes_every_output(clone, run_in_clone):
    proc = run_in_clone(FINETUNE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mod = _load()
    out = clone / "runs" / "finetune-quick"
    with open(out / "finetune_results.json") as fh:
        summary = json.load(fh)
    for name in ("finetune_reward_vs_compute.png", "finetune_samples.png", "finetune_table.md",
                 "finetune_results.json"):
        assert (out / name).stat().st_size > 0, name
    cfg = mod.QUICK
    table = summary["table"]
    assert set(table) == set(cfg.methods)
    runs = summary["runs"]
    assert len(runs) == len(cfg.methods) * len(cfg.seeds)
    # each method's rate was swept on its own seed, over the configured rates and then past the
    # edge that held the best one; the chosen rate is used for every seed
    sweep = summary["sweep"]
    assert all(r["seed"] == cfg.sweep_seed for r in sweep)
    for m in cfg.methods:
        tried = sorted(r["lr"] for r in sweep if r["method"] == m)
        assert set(cfg.lrs) <= set(tried) and len(tried) <= len(cfg.lrs) + cfg.lr_extend
        assert summary["lr_position"][m] == ("interior" if tried[0] < summary["chosen_lr"][m] < tried[-1] else
                                             "top edge" if summary["chosen_lr"][m] == tried[-1] else "bottom edge")
    assert all(r["lr"] == summary["chosen_lr"][r["method"]] for r in runs)
    for r in runs:
        used = r["forward"] + r["backward"]
        # every run spends the budget by the library's meter (checked against each plan's exact
        # cost inside the run), overshooting by at most its last update (<= 3T per sample)
        assert cfg.budget <= used <= cfg.budget + 3 * cfg.T * cfg.batch, (r["method"], used)
        assert used == r["curve"][-1]["compute"]
        assert all(math.isfinite(p["reward"]) and 0 <= p["reward"] <= 1 for p in r["curve"])
    # the cost model decides which roles carry variance
    gv = {k: v["grad_var"] for k, v in table.items()}
    assert gv["zeroth_order"]["FO"] == 0 and gv["zeroth_order"]["HO"] == 0 and gv["zeroth_order"]["ZO"] > 0
    assert gv["reinforce"]["HO"] > 0 and gv["reinforce"]["FO"] == 0 and gv["reinforce"]["ZO"] == 0
    assert gv["full"]["HO"] == 0 and gv["full"]["ZO"] == 0
    # mirrored parameter noise cancels most of the ZO variance
    assert gv["zeroth_order_paired"]["ZO"] < gv["zeroth_order"]["ZO"] / 10
    assert {r["pairing"] for r in runs if r["method"].endswith("_paired")} == {"param"}
    # only plans with backward passes store activations; ZO stores none
    assert table["zeroth_order"]["activation_mb"] == 0
    assert table["draft1"]["activation_mb"] > 0
    assert table["reinforce_grpo"]["label"].startswith("biased") and table["reinforce"]["label"] == "unbiased"
    md = (out / "finetune_table.md").read_text()
    assert all(f"| {m} |" in md for m in cfg.methods)
    assert "## Headroom" in md and "## Learning-rate sweep" in md
    assert summary["config"]["budget"] == cfg.budget


def test_a_wrong_count_stops_the_run():
    """The experiment refuses a run whose metered compute differs from its plans' exact cost."""
    mod = _load()
    method = mod.methods(4)["zeroth_order"]
    rec = {"step": 1, "plan": "zeroth_order", "evaluations_forward": 32, "evaluations_backward": 0}
    mod.check_count(method, [rec], 8, 0)
    with pytest.raises(RuntimeError, match="metered"):
        mod.check_count(method, [dict(rec, evaluations_forward=4)], 8, 0)   # a batch of 8 counted as 1


def test_step_gradients_quick(clone, run_in_clone):
    """experiments/step_gradients.py --quick (the README's command, with --quick) writes its
    table, figure and numbers; the per-step gradients add up to the whole gradient and the
    floor is m times the shared one, or more."""
    proc = run_in_clone(STEP_GRADIENTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = clone / "runs" / "step-gradients"
    with open(out / "step_gradients.json") as fh:
        result = json.load(fh)
    for name in ("step_gradients.md", "step_gradients.png", "step_gradients.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(result["steps"]) == result["T"] and result["d"] > 0
    assert result["floor"][0] >= result["T"] * result["floor_shared"][0] - 1e-30
    assert result["zo_variance"][0] > 0


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
