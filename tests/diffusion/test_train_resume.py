"""Interrupt a tiny SD run after update k and resume: the weights at update n are bit-identical
to an uninterrupted run (LoRA weights, Adam state, RNG states and the softmax sampler's state
all travel through the checkpoint)."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.config import TrainConfig  # noqa: E402
from halforder.diffusion.app.run import build_components, build_reward, build_task  # noqa: E402
from halforder.estimators.samplers import SoftmaxRLR  # noqa: E402
from halforder.training.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from halforder.training.loop import Hooks, train  # noqa: E402

PROMPTS = ["a red square", "a blue circle", "a green field", "a cat"]
VOLATILE = ("time_s", "elapsed_s", "memory_bytes")


class Interrupt(Exception):
    pass


def _run(out, steps, resume=None, stop_at=None, **schedule):
    cfg = TrainConfig(model="tiny", reward="brightness", T=4, estimator="rlr", h=1, j_sampling="softmax",
                      guidance_scale=2.0, steps=steps, batch_size=4, grad_accum=2, lr=1e-2, lora_rank=2,
                      eval_every=0, checkpoint_every=1, keep_checkpoints=0, output_dir=str(out), resume=resume,
                      progress=False, **schedule)
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


SCHEDULES = {"constant": {}, "cosine+warmup+ema": dict(lr_scheduler="cosine", lr_warmup_steps=2, ema=True,
                                                       ema_decay=0.9)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_continues_exactly(tmp_path, schedule):
    """... with the learning-rate schedule and the moving average too (each update's lr is in the
    records compared; the average's state in the checkpoints)."""
    n, k, kw = 4, 2, SCHEDULES[schedule]
    a = _run(tmp_path / "a", n, **kw)
    _run(tmp_path / "b", n, stop_at=k + 1, **kw)              # dies after logging update k+1, before its checkpoint
    b = tmp_path / "b"
    assert os.path.basename(latest_checkpoint(str(b / "checkpoints"))) == f"step_{k:08d}"
    assert len(_metrics(b)) == k + 1
    b_task = _run(b, n, resume="latest", **kw)
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
    if kw:
        # linear warmup over 2 updates from lr / 2 (never 0), then cosine from lr towards 0 over the last 2
        assert [r["lr"] for r in _metrics(b)] == pytest.approx([0.005, 0.01, 0.01, 0.005], abs=1e-12)
        assert ca.ema["optimization_step"] == cb.ema["optimization_step"] == n
        assert all(torch.equal(x, y) for x, y in zip(ca.ema["shadow_params"], cb.ema["shadow_params"]))
    else:
        assert ca.ema is None and {r["lr"] for r in _metrics(b)} == {1e-2}


def test_evaluations_and_exports_use_the_moving_average(tmp_path):
    """With ema on, the evaluation hook and the exported LoRA file see the averaged weights, the
    checkpoint keeps the raw ones; ema_decay alone, and a decaying schedule resumed with other
    steps, are refused."""
    from safetensors.torch import load_file

    from halforder.training.config import ConfigError

    seen = {}
    cfg = TrainConfig(model="tiny", reward="brightness", T=4, h=1, guidance_scale=2.0, steps=3, batch_size=4,
                      lr=1e-2, lora_rank=2, eval_every=3, checkpoint_every=3, ema=True, ema_decay=0.5,
                      output_dir=str(tmp_path / "run"), progress=False)
    task = build_task(cfg, build_components(cfg), build_reward(cfg))
    hooks = Hooks(evaluate=lambda step: seen.update({step: {k: p.detach().clone() for k, p in task.params.items()}}),
                  weights=lambda d: task.save_adapter(os.path.join(d, "lora")))
    train(task, cfg.sampler(), PROMPTS, cfg, hooks=hooks)
    ck = load_checkpoint(latest_checkpoint(str(tmp_path / "run" / "checkpoints")))
    average = dict(zip(task.params, ck.ema["shadow_params"]))
    for k, p in task.params.items():
        assert torch.equal(seen[3][k], average[k]) and torch.equal(p.detach(), ck.params[k])
    assert any(not torch.equal(average[k], ck.params[k]) for k in average)
    lora = load_file(os.path.join(ck.path, "lora", "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(v, average[k.removeprefix("unet.").replace(".weight", ".default.weight")])
               for k, v in lora.items())
    with pytest.raises(ConfigError, match="ema_decay=0.5 has no effect here: it applies only with ema"):
        TrainConfig(ema_decay=0.5)
    from halforder.training.resume import check_resume
    with pytest.raises(ConfigError, match="its cosine learning-rate schedule runs over steps=3"):
        check_resume(TrainConfig(**{**ck.config, "lr_scheduler": "cosine", "steps": 9}),
                     type(ck)(**{**ck.__dict__, "config": {**ck.config, "lr_scheduler": "cosine"}}))
