"""Diffusive Chain-of-Thought: prompt files, the step split, the HO window, and a chain
whose step t really is conditioned on its group's prompt."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from halforder.diffusion import ImageView, add_lora, encode_prompts, tiny_components, unet_latent_shape  # noqa: E402
from halforder.diffusion.sampling.chain import NoiseScales  # noqa: E402
from halforder.diffusion.app.dcot import (PAPER_WINDOW, DCoTConditioning, StepSplit, load_dcot_prompts,  # noqa: E402
                                          parse_dcot_prompts, window_levels)
from halforder.diffusion.rewards import make_reward  # noqa: E402
from halforder.diffusion.app.task import DiffusionTask  # noqa: E402
from halforder.estimators import estimate  # noqa: E402
from halforder.estimators.samplers import WindowRLR  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "dcot_hands.yaml")
ENTRY = {"prompt": "a cat", "coarse": "an animal", "mid": "a cat sitting", "fine": "fur texture"}


def test_hand_prompts_file():
    """The shipped file holds the paper's three Figure-10 hand prompts with their levels."""
    ps = load_dcot_prompts(DATA)
    assert [p.prompt for p in ps] == ["A realistic open palm facing upward", "A picture of a hand facing downward",
                                      "A hand in a relaxed position"]
    assert ps[0].coarse == "A single human hand positioned with the palm facing upward"
    assert ps[2].fine.startswith("Subtle skin folds at the joints")


def test_prompt_file_errors(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"prompts": [ENTRY]}))
    assert load_dcot_prompts(str(good))[0].mid == "a cat sitting"
    cases = [({"prompts": []}, "non-empty list"),
             ({"prompts": [{**ENTRY, "fine": ""}]}, r"lacks non-empty strings for \['fine'\]"),
             ({"prompts": [{**ENTRY, "ultra": "x"}]}, "unknown keys"),
             ({"prompts": [ENTRY, ENTRY]}, "appears twice"),
             ({"prompt": [ENTRY]}, "unknown top-level keys")]
    for data, msg in cases:
        with pytest.raises(ValueError, match=msg):
            parse_dcot_prompts(data)
    bad = tmp_path / "p.txt"
    bad.write_text("a cat")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):   # TOML is read too now
        load_dcot_prompts(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        load_dcot_prompts(str(tmp_path / "none.yaml"))


def test_step_split():
    s = StepSplit.make(50)
    assert (s.coarse, s.mid, s.fine) == (17, 17, 16)
    assert s.steps("coarse") == range(34, 51) and s.steps("fine") == range(1, 17)
    assert [s.level(t) for t in (50, 34, 33, 17, 16, 1)] == ["coarse", "coarse", "mid", "mid", "fine", "fine"]
    assert StepSplit.make(10, (2, 3, 5)) == StepSplit(2, 3, 5)
    assert StepSplit.make(10, (0.25, 0.25, 0.5)) == StepSplit(3, 2, 5)     # largest remainder
    for T, split, msg in [(10, (2, 3, 4), "covers 9 steps"), (10, (0, 5, 5), "at least one step"),
                          (10, (5, 5), "needs 3 values"), (2, None, "T >= 3"), (10, (0.5, 0.6, -0.1), "fractions")]:
        with pytest.raises(ValueError, match=msg):
            StepSplit.make(T, split)


def test_window_validation():
    a, b = PAPER_WINDOW
    sampler = WindowRLR(50, 2, a, b)
    js = {sampler.sample({}, torch.Generator().manual_seed(i)).blocks[0][0] for i in range(200)}
    assert js == set(range(a, b + 1))
    assert window_levels(StepSplit.make(50), 2, a, b) == ("coarse", "mid")
    # WindowRLR's messages: a window that does not fit is refused at the end that is no
    # admissible block start; a reversed window fails b - a > h; h = 0 is refused as h >= 1.
    fit = r"needs 2 <= j <= T-h\+1 = 49"
    for args, msg in [((50, 2, 30, 32), "b - a > h"), ((50, 2, 1, 10), fit + r".*got j=1$"),
                      ((50, 2, 40, 50), fit + r".*got j=50$"), ((50, 2, 40, 30), r"\[40, 30\] needs b - a > h"),
                      ((50, 0, 30, 40), "h >= 1")]:
        with pytest.raises(ValueError, match=msg):
            WindowRLR(*args)


def _image_view(c):
    return ImageView(c.vae, unet_latent_shape(c.unet))


def _dcot_task(T=6):
    c = tiny_components(0)
    params = add_lora(c.unet, rank=2, init=False, seed=0)
    entries = parse_dcot_prompts([ENTRY, {"prompt": "a dog", "coarse": "a shape", "mid": "a dog running",
                                          "fine": "wet nose"}])
    return c, DiffusionTask(c, params, make_reward("random_cnn"), _image_view(c), T, guidance_scale=1.0,
                            noise_scales=NoiseScales(eta_plan=1.0, zo_sigma=0.05),
                            step_prompts=DCoTConditioning(entries, StepSplit.make(T, (2, 2, 2))))


def test_dcot_chain_switches_prompts():
    """Step t's denoiser uses the embedding of its group's prompts, and no other group's;
    the reward sees the original prompts."""
    c, task = _dcot_task()
    seen = []
    task = DiffusionTask(c, task.params, lambda im, p: seen.append(p) or im.mean((1, 2, 3)), _image_view(c), 6,
                         guidance_scale=1.0, step_prompts=task.step_prompts)
    sampler = WindowRLR(6, 1, 2, 4)
    plan = sampler.sample({}, torch.Generator().manual_seed(0))
    chain = task.chain(plan, ["a cat", "a dog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    levels = {"coarse": ["an animal", "a shape"], "mid": ["a cat sitting", "a dog running"],
              "fine": ["fur texture", "wet nose"]}
    embeds = {k: encode_prompts(c, v) for k, v in levels.items()}
    for t in range(6, 0, -1):
        own = {6: "coarse", 5: "coarse", 4: "mid", 3: "mid", 2: "fine", 1: "fine"}[t]
        ts = chain.denoiser.timesteps[t - 1]
        out = chain.denoiser(x, t, {})
        for level, e in embeds.items():
            ref = c.unet(x, ts, encoder_hidden_states=e).sample
            assert torch.equal(out, ref) == (level == own), (t, level)
    chain.reward(x)
    assert seen == [["a cat", "a dog"]]
    with pytest.raises(ValueError, match="no DCoT levels"):
        task.chain(plan, ["a horse"])


def test_dcot_task_gives_lora_gradients():
    c, task = _dcot_task()
    plan = WindowRLR(6, 2, 2, 5).sample({}, torch.Generator().manual_seed(1))
    chain = task.chain(plan, ["a cat", "a dog"])
    est = estimate(chain, plan, task.trainable(), chain.sample_start(2, torch.Generator().manual_seed(0)),
                   generator=torch.Generator().manual_seed(2), baseline="loo")
    flat = torch.cat([g.flatten() for g in est.grad.values()])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    assert torch.cat([g.flatten() for g in est.parts["HO"].values()]).abs().sum() > 0
    assert task.previews(["a cat"], torch.Generator().manual_seed(0)).shape == (1, 3, 16, 16)


def test_dcot_conditioning_drives_a_video_task():
    """The same conditioning, given to a task with a video view, switches the UNet3D's context per group."""
    from halforder.diffusion.models.video import tiny_video_components, video_view
    from halforder.diffusion.rewards.video import make_video_reward
    from halforder.estimators import Plan

    c = tiny_video_components(0)
    cond = DCoTConditioning(parse_dcot_prompts([ENTRY]), StepSplit.make(3))
    task = DiffusionTask(c, {}, make_video_reward("brightness"), video_view(c, 2, "random"), 3, guidance_scale=1.0,
                         step_prompts=cond)
    chain = task.chain(Plan.full(3), ["a cat"])
    for t, level in ((3, "coarse"), (2, "mid"), (1, "fine")):
        assert torch.equal(chain.denoiser.context(t), encode_prompts(c, [ENTRY[level]]))
    assert chain.reward_fn.prompts == ("a cat",)


def test_dcot_cli_tiny_run(tmp_path, monkeypatch):
    """`halforder train --preset tiny --dcot data/dcot_hands.yaml` runs offline on CPU (the
    preset's T = 6 >= 3 steps, one group per level) and logs every update's plan."""
    from halforder.diffusion.app.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tmp"
    assert main(["--preset", "tiny", "--dcot", DATA, "--steps", "2", "--output-dir", str(out), "--no-progress"]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    updates = [r for r in recs if "plan" in r]
    assert [r["step"] for r in updates] == [1, 2] and all(r["plan"].startswith("rlr") for r in updates)
    assert json.load(open(out / "config.json"))["dcot"] == DATA


def test_dcot_honours_gradient_checkpointing():
    """A DCoT run with gradient_checkpointing builds checkpointed chains."""
    from halforder.diffusion.app.config import TrainConfig
    from halforder.diffusion.app.run import prepare
    from halforder.estimators import Checkpointed

    cfg = TrainConfig(model="tiny", reward="brightness", T=6, guidance_scale=2.0, steps=2, batch_size=4, grad_accum=1,
                      lr=1e-2, lora_rank=2, lora_alpha=2.0, h=2, output_dir=None, progress=False, dcot=DATA,
                      gradient_checkpointing=True)
    prepared = prepare(cfg, "cpu")
    plan = prepared.sampler.sample(prepared.sampler.init(), torch.Generator().manual_seed(0))
    assert isinstance(prepared.task.chain(plan, prepared.prompts[:2]), Checkpointed)
