"""Smoke test of experiments/no_gradient.py --quick: every method runs through the library's
training loop on both rewards with no gradient, each run's count equals its plans' exact cost,
and every output is written outside docs/. Nothing is downloaded: the tiny flow model and the
classifiers are trained in the run's cache (runs/cache). Also: the binary reward agrees with
its classifier on held-out images, and the flow model's weights are cached."""
import importlib
import json
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLONE_COMMANDS = [QUICK] = ["python experiments/no_gradient.py --quick"]


def _load(name="experiments.no_gradient"):
    sys.path.insert(0, ROOT)
    return importlib.import_module(name)


def test_quick_run_writes_every_output(clone, run_in_clone):
    proc = run_in_clone(QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.status == "", proc.status                      # nothing tracked changed, nothing new outside runs/
    cfg = _load().QUICK
    out = clone / "runs" / "no-gradient-quick"
    for name in ("no_gradient_table.md", "no_gradient_results.json", "no_gradient_reward_vs_compute.png",
                 "no_gradient_samples.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "no_gradient_results.json").read_text())
    runs = summary["runs"]
    jpeg = [m for m in cfg.methods if m in cfg.jpeg_methods]
    assert len(runs) == (len(cfg.methods) + len(jpeg)) * len(cfg.seeds)
    assert {(r["reward_name"], r["method"]) for r in runs} == {*(("prompt", m) for m in cfg.methods),
                                                                *(("jpeg", m) for m in jpeg)}
    for r in runs:
        used = r["forward"] + r["backward"]
        # the budget by the library's meter (each step checked against its plan's exact cost in
        # the run), overshooting by at most one step: a rollout and U passes of 2 evaluations a step
        assert cfg.budget <= used <= cfg.budget + cfg.batch * cfg.T * 5, (r["method"], used)
        assert used == r["curve"][-1]["compute"]
        assert r["lr"] == summary["chosen_lr"][r["reward_name"]][r["method"]]
        for p in r["curve"]:
            assert 0 <= p["prompt/train"] <= 1 and 0 <= p["prompt/held_out"] <= 1 and p["jpeg/train"] < 0
    assert {r["seed"] for r in summary["sweep"]} == {cfg.sweep_seed}
    advice = summary["advice"]
    assert advice["spent"] <= cfg.diagnose_budget and summary["group"] in (2, 4, 8)
    md = (out / "no_gradient_table.md").read_text()
    assert "## The group size `halforder diagnose` advised" in md and "## Trained on `jpeg`" in md
    assert all(f"| {m} |" in md for m in cfg.methods)
    assert summary["config"]["seeds"] == list(cfg.seeds)


def test_each_method_is_the_recipe_it_names():
    world = _load("experiments.no_gradient_world")
    cfg = world.ExperimentConfig()
    ms = world.methods(cfg, 4)
    assert set(ms) == set(world.METHODS) == set(cfg.methods)
    g = torch.Generator().manual_seed(0)
    plan = (lambda name: ms[name].sampler.sample(ms[name].sampler.init(), g))  # noqa: E731
    assert plan("flow_grpo_kl0.04").steps("HO") == tuple(range(2, cfg.T + 1))   # every step but the last
    assert ms["flow_grpo_kl0.04"].updates == 2 and ms["flow_grpo_kl0.04"].kl_beta == 0.04
    assert ms["flow_grpo_kl0"].clipped and not ms["reinforce_loo"].clipped
    for name in ("dance", "mix", "fast"):
        field, weighted = plan(name), plan(name + "_weighted")
        assert set(field.weights) == {1.0} and max(weighted.weights) > 1.0
    assert set(plan("fast").steps("HO")) <= set(range(cfg.T // 2 + 1, cfg.T + 1)) and ms["fast"].noise == "cps"
    for name in ("zo", "zo_paired", "rlr_no_fo", "rlr_no_fo_paired"):
        assert plan(name).fo_steps == 0 and plan(name).steps("ZO")
    assert ms["zo_paired"].pairing == "param" and ms["zo_paired"].group % 2 == 0


def test_a_wrong_count_stops_the_run():
    mod, world = _load(), _load("experiments.no_gradient_world")
    ms = world.methods(world.ExperimentConfig(T=4), 4)
    rec = {"step": 1, "plan": "reinforce[2, 3, 4]", "evaluations_forward": 16 * (4 + 2 * 3),
           "evaluations_backward": 16 * 2 * 3, "skipped": False}
    mod.check_count(ms["flow_grpo_kl0"], [rec], 16, 0)                # a rollout, then 2 passes of 3 steps
    with pytest.raises(RuntimeError, match="metered"):
        mod.check_count(ms["flow_grpo_kl0"], [dict(rec, evaluations_backward=16 * 3)], 16, 0)   # one pass counted


def test_the_binary_reward_is_its_classifiers_decision_on_held_out_images():
    """On images the classifier never saw: the experiment's own classifier (committed in
    experiments/cache)."""
    cfg = _load("experiments.no_gradient_world").ExperimentConfig()
    from experiments.shapes.data import COLOURS, SHAPES, sample_shapes
    from experiments.shapes.prompt_rewards import PromptFollowing, prompt_classifier
    from experiments.shapes.prompted import prompt_of

    reward = PromptFollowing(prompt_classifier(cfg.classifier, os.path.join(ROOT, "experiments", "cache")))
    assert reward.differentiable is False
    x, shape, colour = sample_shapes(256, generator=torch.Generator().manual_seed(4321))   # not seen in training
    images = (x + 1) / 2
    logits = reward.classifier(x)
    found_shape, found_colour = logits[:, :len(SHAPES)].argmax(1), logits[:, len(SHAPES):].argmax(1)
    for s, c in ((shape, colour), (torch.roll(shape, 1), colour), (shape, (colour + 1) % len(COLOURS))):
        r = reward(images, prompt_of(s, c))
        assert torch.equal(r, ((found_shape == s) & (found_colour == c)).float()) and not r.requires_grad
    assert float(reward(images, prompt_of(shape, colour)).mean()) > 0.9          # the classifier is accurate
    assert float(reward(images, prompt_of(shape, (colour + 1) % len(COLOURS))).mean()) < 0.1
    with pytest.raises(ValueError, match="name a colour and a shape"):
        reward(images[:1], ["a photo of a cat"])


def test_flow_weights_are_cached(tmp_path):
    _load()
    from experiments.shapes.prompted import FlowPretrainConfig, pretrained_components

    cfg = FlowPretrainConfig(layers=1, heads=2, steps=2, batch=4)
    a = pretrained_components(cfg, tmp_path, progress=False)
    assert os.listdir(tmp_path) == [f"flow-{cfg.key()}.safetensors"]
    b = pretrained_components(cfg, tmp_path, progress=False)
    for (ka, va), (kb, vb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert ka == kb and va.equal(vb)
