"""Interrupt a tiny SD run after update k and resume: the weights at update n are bit-identical
to an uninterrupted run (LoRA weights, Adam state, RNG states and the softmax sampler's state
all travel through the checkpoint)."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.config import TrainConfig  # noqa: E402
from halforder.diffusion.run import build_components, build_reward, build_task  # noqa: E402
from halforder.estimators.samplers import SoftmaxRLR  # noqa: E402
from halforder.training.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from halforder.training.loop import Hooks, train  # noqa: E402

PROMPTS = ["a red square", "a blue circle", "a green field", "a cat"]
VOLATILE = ("time_s", "elapsed_s", "memory_bytes")


class Interrupt(Exception):
    pass


def _run(out, steps, resume=None, stop_at=None):
    cfg = TrainConfig(model="tiny", reward="brightness", T=4, estimator="rlr", h=1, j_sampling="softmax",
                      guidance_scale=2.0, steps=steps, batch_size=4, grad_accum=2, lr=1e-2, lora_rank=2,
                      eval_every=0, checkpoint_every=1, keep_checkpoints=0, output_dir=str(out), resume=resume,
                      progress=False)
    task = build_task(cfg, build_components(cfg), build_reward(cfg))

    def hook(rec, est):
        if rec["step"] == stop_at:
            raise Interrupt

    try:
        train(task, SoftmaxRLR(cfg.T, cfg.h), PROMPTS, cfg, hooks=Hooks(on_step=hook))
    except Interrupt:
        pass
    return task


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f]


def test_resume_continues_exactly(tmp_path):
    n, k = 4, 2
    a = _run(tmp_path / "a", n)
    _run(tmp_path / "b", n, stop_at=k + 1)                   # dies after logging update k+1, before its checkpoint
    b = tmp_path / "b"
    assert os.path.basename(latest_checkpoint(str(b / "checkpoints"))) == f"step_{k:08d}"
    assert len(_metrics(b)) == k + 1
    b_task = _run(b, n, resume="latest")
    for name, p in a.params.items():
        assert torch.equal(p.detach(), b_task.params[name].detach()), name
    assert _metrics(tmp_path / "a") == _metrics(b)          # same plans (j), rewards and norms; no duplicate lines
    ca = load_checkpoint(latest_checkpoint(str(tmp_path / "a" / "checkpoints")))
    cb = load_checkpoint(latest_checkpoint(str(b / "checkpoints")))
    assert ca.step == cb.step == n
    for key in ca.sampler_state:
        assert torch.equal(ca.sampler_state[key], cb.sampler_state[key])
    assert int(ca.sampler_state["count"].sum()) == n          # the sampler saw every update
    for s in ca.optimizer["state"]:
        for key, v in ca.optimizer["state"][s].items():
            assert torch.equal(v, cb.optimizer["state"][s][key])
    assert all(torch.equal(ca.rng[0][g], cb.rng[0][g]) for g in ca.rng[0])
