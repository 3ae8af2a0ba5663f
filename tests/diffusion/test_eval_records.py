"""A fine-tuning run logs the reward on its evaluation prompts, each sample with its prompt,
and names the trackers it writes to with --report-to."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.diffusion.app.config import TINY_EVAL_PROMPTS, load_config  # noqa: E402
from halforder.diffusion.rewards import make_reward  # noqa: E402
from halforder.diffusion.app.run import prepare  # noqa: E402



def test_evaluation_records_hold_each_prompt_and_its_reward(tmp_path):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--steps", "1", "--eval-every", "1", "--output-dir", str(out),
                 "--no-progress"]) == 0
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [r["step"] for r in evals] == [0, 1]
    prompts = list(TINY_EVAL_PROMPTS["t2i"])
    for r in evals:
        samples = r["eval"]["samples"]
        assert [s["prompt"] for s in samples] == prompts
        rewards = [s["reward"] for s in samples]
        assert all(0 < x < 1 for x in rewards)                      # brightness of images in [0, 1]
        assert r["eval"]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)


def test_the_evaluation_reward_is_the_reward_of_the_previewed_images():
    cfg = load_config(None, dict(steps=1, output_dir=None, progress=False), preset="tiny")
    prepared = prepare(cfg)
    prompts = prepared.eval_prompts
    color = make_reward("color", target=[0.0, 1.0, 0.0])
    images, rewards, others = prepared.task.evaluate(prompts, torch.Generator().manual_seed(0), {"color": color})
    assert images.shape[0] == rewards.shape[0] == len(prompts)
    assert torch.allclose(rewards, make_reward("brightness")(images, prompts).float())
    assert torch.allclose(others["color"], color(images, prompts).float())
    assert torch.equal(images, prepared.task.previews(prompts, torch.Generator().manual_seed(0)))


def test_other_rewards_are_logged_beside_the_trained_one(tmp_path):
    """--eval-rewards: e.g. a CLIP score beside an aesthetic reward; here a colour reward beside
    brightness, on the same evaluation samples."""
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--steps", "1", "--eval-every", "1", "--output-dir", str(out), "--no-progress",
                 "--eval-rewards", '{"color": {"target": [0, 1, 0]}}']) == 0
    evals = [json.loads(line)["eval"] for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert len(evals) == 2 and all(-3 < e["color_mean"] < 0 and 0 < e["reward_mean"] < 1 for e in evals)


def test_a_tracker_that_is_not_installed_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--report-to", "jsonl", "wandb", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "halforder train: error: report_to wandb needs the wandb package, which is not installed: " \
           "pip install wandb" in err
    assert not out.exists()
