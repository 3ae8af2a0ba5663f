"""`halforder train` started as 2 CPU processes with torchrun (gloo): the update uses the
gradient averaged over both processes. The test recomputes each process's own estimate in
this process (same seeds), averages them, and checks the logged norms, the rewards and
the LoRA weights after one Adam step against the 2-process run."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from halforder.diffusion.app.config import load_config  # noqa: E402
from halforder.diffusion.app.run import prepare  # noqa: E402
from halforder.training.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from halforder.training.loop import TrainRNG  # noqa: E402
from halforder.training.update_rules import update_rule  # noqa: E402


def _norm(d):
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))


def test_two_processes_average_gradients(tmp_path, two_process_run):
    out, flags = two_process_run     # shared with test_compute.py's count across processes
    rec, = [json.loads(line) for line in open(out / "metrics.jsonl")]
    ck = load_checkpoint(latest_checkpoint(str(out / "checkpoints")))
    assert ck.num_processes == 2 and ck.step == 1

    cfg = load_config(None, dict(flags, output_dir=str(tmp_path / "reference")))   # same seeds, fresh directory
    prepared = prepare(cfg)
    task, sampler, prompts = prepared.task, prepared.sampler, prepared.prompts
    plan = sampler.sample(sampler.init(), TrainRNG.seeded(cfg.seed).plan)
    assert rec["plan"] == str(plan)
    ests = [_one_update(task, plan, task.params, prompts, cfg, TrainRNG.seeded(cfg.seed, rank))
            for rank in (0, 1)]
    mean = {k: (ests[0].grad[k] + ests[1].grad[k]) / 2 for k in task.params}
    assert rec["grad_norm"] == pytest.approx(_norm(mean), rel=1e-4)
    for role in ("HO", "ZO"):
        part = {k: (ests[0].parts[role][k] + ests[1].parts[role][k]) / 2 for k in task.params}
        assert rec[f"grad_norm_{role}"] == pytest.approx(_norm(part), rel=1e-4)
    for e in ests:   # the average is not either process's own estimate
        assert abs(_norm(e.grad) - _norm(mean)) > 1e-2 * _norm(mean)
    rewards = torch.cat([e.reward for e in ests])
    assert rec["reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-5)
    assert rec["reward_std"] == pytest.approx(float(rewards.std()), rel=1e-4)

    # one AdamW step with the averaged gradient reproduces the 2-process weights
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in task.params.items()}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    for k, p in params.items():
        p.grad = -mean[k]
    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_norm)
    opt.step()
    moved = 0
    for k, p in params.items():
        assert torch.allclose(ck.params[k], p.detach(), rtol=0, atol=1e-6 * cfg.lr / 1e-2), k
        moved += int(not torch.equal(ck.params[k], task.params[k].detach()))
    assert moved > 0


def _one_update(task, plan, params, items, cfg, rng):
    """The one estimate of an on-policy update, as the loop draws it."""
    from halforder.training.update_rules import update_rule
    return next(update_rule(cfg).updates({}, task, plan, params, items, rng))
