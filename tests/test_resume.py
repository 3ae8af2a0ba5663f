"""Resuming through the training loop's API (a toy task, fast): a resume may change only the
config's RESUMABLE settings, keeps the run's config.json and records what it changed in
resumes.jsonl; 'latest' with no checkpoint, or a checkpoint at or past ``steps``, is refused."""
import json
import os
import re

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from halforder.estimators import Plan  # noqa: E402
from halforder.estimators.samplers import FixedPlan  # noqa: E402
from halforder.toy import tanh_chain  # noqa: E402
from halforder.training.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from halforder.training.config import ConfigError, LoopConfig  # noqa: E402
from halforder.training.loop import train  # noqa: E402


class ToyTask:
    """A tanh chain (T=4, d=3) whose parameters are trained; the plan and prompts are ignored."""

    def __init__(self):
        self.base, params = tanh_chain(T=4, d=3, sigma=0.3, tau=0.1, seed=0)
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}

    def trainable(self):
        return self.params

    def chain(self, plan, prompts, generator=None):
        return self.base


def _train(out, **kw):
    cfg = LoopConfig(**{**dict(steps=2, batch_size=4, grad_accum=1, lr=1e-2, eval_every=0, checkpoint_every=1,
                               output_dir=str(out), progress=False), **kw})
    return train(ToyTask(), FixedPlan(Plan.full(4)), ["p"], cfg)


def test_a_resume_keeps_config_json_and_records_its_changes(tmp_path):
    out = tmp_path / "run"
    _train(out)
    original = (out / "config.json").read_bytes()
    assert load_checkpoint(latest_checkpoint(str(out / "checkpoints"))).config == json.loads(original)
    res = _train(out, steps=4, eval_every=2, resume="latest")
    assert res.step == 4
    assert (out / "config.json").read_bytes() == original
    rec, = [json.loads(line) for line in open(out / "resumes.jsonl")]
    assert rec["step"] == 2 and rec["checkpoint"].endswith("step_00000002")
    assert rec["changes"] == {"steps": [2, 4], "eval_every": [0, 2], "resume": [None, "latest"]}
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(batch_size=8), dict(seed=1), dict(pairing="none"),
                                    dict(adam_betas=[0.5, 0.9])])
def test_a_resume_refuses_other_settings_and_lists_them(tmp_path, change):
    out = tmp_path / "run"
    _train(out)
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_bytes()
    (name, value), = change.items()
    with pytest.raises(ConfigError, match=rf"cannot resume .*{name} was .*, now {re.escape(repr(value))}\. A "
                                          r"resume may change only .*steps"):
        _train(out, steps=4, resume="latest", **change)
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_bytes()) == before


def test_the_resumable_settings_are_those_that_do_not_change_what_is_trained():
    assert LoopConfig.RESUMABLE == {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "resume",
                                    "output_dir", "progress", "report_to"}


def test_nothing_to_resume(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume: .* holds no checkpoint"):
        _train(tmp_path / "fresh", resume="latest")
    assert not (tmp_path / "fresh").exists()
    out = tmp_path / "run"
    _train(out)
    for steps, match in ((2, "at update 2, so the run of steps=2 is complete"), (1, "at update 2, past steps=1")):
        with pytest.raises(ConfigError, match=f"nothing to resume: .*{match}; pass --steps N with N > 2"):
            _train(out, steps=steps, resume="latest")
    assert not (out / "resumes.jsonl").exists()


def test_a_decaying_schedule_says_how_to_train_further_whatever_steps_are_asked(tmp_path):
    """A finished cosine run, resumed with its own steps or with more, gets the same advice: a
    new run over the new total or from the checkpoint's weights (a resume cannot move the
    schedule's end); an unfinished one is told to finish with its own steps."""
    out = tmp_path / "run"
    _train(out, lr_scheduler="cosine")
    hints = []
    for steps in (2, 6):
        with pytest.raises(ConfigError) as e:
            _train(out, steps=steps, lr_scheduler="cosine", resume="latest")
        message = str(e.value)
        assert "resume with" not in message and "N > 2" not in message, message
        hints.append(message[message.index("to train beyond update 2"):])
    assert hints[0] == hints[1].replace("--steps 6", "--steps N")
    assert "start a new run" in hints[0] and "halforder export" in hints[0] and "--fuse, then --model DIR" in hints[0]
    first = os.path.join(out, "checkpoints", "step_00000001")
    with pytest.raises(ConfigError, match="resume with --steps 2 to finish it; to train beyond update 1"):
        _train(out, steps=6, lr_scheduler="cosine", resume=first)


def test_a_clipped_ratio_run_with_a_kl_resumes_bit_for_bit(tmp_path):
    """The update rule's state (the KL's reference weights) is checkpointed: 2 + 2 updates
    resumed equal 4 uninterrupted, with PPO's reuse and the KL to the starting weights."""
    def run(out, **kw):
        cfg = LoopConfig(**{**dict(steps=4, batch_size=4, grad_accum=1, lr=5e-2, eval_every=0, checkpoint_every=1,
                                   output_dir=str(out), progress=False, clip_range=0.2, updates_per_rollout=2,
                                   kl_beta=0.5, group_size=2, baseline="grpo"), **kw})
        task = ToyTask()
        task.base = tanh_chain(T=4, d=3, sigma=0.3, tau=0.0, seed=0)[0]    # Gaussian steps
        train(task, FixedPlan(Plan.reinforce(4)), ["p"], cfg)
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    whole = run(tmp_path / "whole")
    run(tmp_path / "parts", steps=2)
    parts = run(tmp_path / "parts", resume="latest")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    drop = ("time_s", "elapsed_s", "memory_bytes")
    assert [{k: v for k, v in r.items() if k not in drop} for r in parts] == \
           [{k: v for k, v in r.items() if k not in drop} for r in whole]
    assert whole[-1]["kl"] > 0 and whole[-1]["updates"] == 2
