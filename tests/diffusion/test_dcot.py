"""Diffusive Chain-of-Thought: prompt files, the step split, the HO window, and a chain
whose step t really is conditioned on its group's prompt."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from halforder.diffusion import add_lora, encode_prompts, tiny_components  # noqa: E402
from halforder.diffusion.dcot import (PAPER_WINDOW, DCoTConditioning, DCoTTask, StepSplit,  # noqa: E402
                                      load_dcot_prompts, parse_dcot_prompts, window_levels, window_sampler)
from halforder.diffusion.rewards import make_reward  # noqa: E402
from halforder.diffusion.task import SDTask  # noqa: E402
from halforder.estimators import estimate  # noqa: E402

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
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
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
    sampler = window_sampler(50, 2, a, b)
    js = {sampler.sample({}, torch.Generator().manual_seed(i)).blocks[0][0] for i in range(200)}
    assert js == set(range(a, b + 1))
    assert window_levels(StepSplit.make(50), 2, a, b) == ("coarse", "mid")
    for args, msg in [((50, 2, 30, 32), "b - a > h"), ((50, 2, 1, 10), "does not fit"),
                      ((50, 2, 40, 50), "does not fit"), ((50, 2, 40, 30), "a < b"), ((50, 0, 30, 40), "h must be")]:
        with pytest.raises(ValueError, match=msg):
            window_sampler(*args)


def _dcot_task(T=6):
    c = tiny_components(0)
    params = add_lora(c.unet, rank=2, init=False, seed=0)
    base = SDTask(c, params, make_reward("random_cnn"), T, guidance_scale=1.0, eta_plan=1.0, zo_sigma=0.05)
    entries = parse_dcot_prompts([ENTRY, {"prompt": "a dog", "coarse": "a shape", "mid": "a dog running",
                                          "fine": "wet nose"}])
    return c, DCoTTask(base, DCoTConditioning(entries, StepSplit.make(T, (2, 2, 2))))


def test_dcot_chain_switches_prompts():
    """Step t's denoiser uses the embedding of its group's prompts, and no other group's;
    the reward sees the original prompts."""
    c, task = _dcot_task()
    seen = []
    task = DCoTTask(SDTask(c, task.base.params, lambda im, p: seen.append(p) or im.mean((1, 2, 3)), 6,
                           guidance_scale=1.0), task.conditioning)
    sampler = window_sampler(6, 1, 2, 4)
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
    plan = window_sampler(6, 2, 2, 5).sample({}, torch.Generator().manual_seed(1))
    chain = task.chain(plan, ["a cat", "a dog"])
    est = estimate(chain, plan, task.trainable(), task.start(chain, 2, torch.Generator().manual_seed(0)),
                   generator=torch.Generator().manual_seed(2), baseline="loo")
    flat = torch.cat([g.flatten() for g in est.grad.values()])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    assert torch.cat([g.flatten() for g in est.parts["HO"].values()]).abs().sum() > 0
    assert task.images(["a cat"], torch.Generator().manual_seed(0)).shape == (1, 3, 16, 16)


def test_dcot_conditioning_drives_a_video_task():
    """The same conditioning, given to a VideoTask, switches the UNet3D's context per group."""
    from halforder.diffusion.video import VideoTask, tiny_video_components
    from halforder.diffusion.video_rewards import make_video_reward
    from halforder.estimators import Plan

    c = tiny_video_components(0)
    cond = DCoTConditioning(parse_dcot_prompts([ENTRY]), StepSplit.make(3))
    task = VideoTask(c, {}, make_video_reward("brightness"), 3, num_frames=2, guidance_scale=1.0,
                     step_prompts=cond)
    chain = task.chain(Plan.full(3), ["a cat"])
    for t, level in ((3, "coarse"), (2, "mid"), (1, "fine")):
        assert torch.equal(chain.denoiser.context(t), encode_prompts(c, [ENTRY[level]]))
    assert chain.reward_fn.prompts == ("a cat",)
