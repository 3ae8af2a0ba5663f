"""The model-agnostic training loop (halforder.training) on a toy task (fast): NaN/inf skip,
gradient accumulation, checkpoint format and corruption, resume checks, gradient checkpointing.

Moved here from tests/diffusion/test_train_loop.py: none of these needs a diffusion model."""
import json
import os

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from halforder.estimators import Plan  # noqa: E402
from halforder.estimators.samplers import FixedPlan  # noqa: E402
from halforder.toy import tanh_chain  # noqa: E402
from halforder.training.checkpoints import (CheckpointError, latest_checkpoint, list_checkpoints,  # noqa: E402
                                            load_checkpoint, save_checkpoint)
from halforder.training.config import LoopConfig  # noqa: E402
from halforder.training.loop import Hooks, train  # noqa: E402


class ToyTask:
    """A tanh chain (T=4, d=3) as a training-loop task; ``bad`` maps an update index to how its
    reward misbehaves ("nan", "inf" value, or "nan_grad": finite value, NaN gradient)."""

    def __init__(self, bad=None):
        self.base, params = tanh_chain(T=4, d=3, sigma=0.3, tau=0.1, seed=0)
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
        self.bad, self.calls = dict(bad or {}), 0

    def trainable(self):
        return self.params

    def chain(self, plan, prompts, generator=None):
        self.calls += 1
        mode, base = self.bad.get(self.calls), self.base.reward_fn

        def reward(x0):
            r = base(x0)
            if mode == "nan":
                return r * float("nan")
            if mode == "inf":
                return r + float("inf")
            if mode == "nan_grad":   # value 0 + r, derivative of sqrt at 0 is 0/0
                return r + torch.sqrt(x0[:, 0] - x0[:, 0])
            return r
        return type(self.base)(self.base.T, self.base.d, self.base.sigmas, self.base.taus, reward,
                               self.base.x_T_mean)


def _cfg(tmp_path, **kw):
    base = dict(steps=3, batch_size=4, grad_accum=1, lr=1e-2, eval_every=0, checkpoint_every=0,
                output_dir=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return LoopConfig(**base)


def _snapshots(task):
    snaps = []
    return snaps, (lambda rec, est: snaps.append({k: v.detach().clone() for k, v in task.params.items()}))


@pytest.mark.parametrize("mode,reason,plan", [("nan", "non-finite reward", Plan.reinforce(4)),
                                              ("inf", "non-finite reward", Plan.rlr(4, 2, 2)),
                                              ("nan_grad", "non-finite gradient", Plan.full(4))])
def test_non_finite_update_is_skipped_and_logged(tmp_path, mode, reason, plan):
    task = ToyTask(bad={2: mode})
    before = {k: v.detach().clone() for k, v in task.params.items()}
    snaps, hook = _snapshots(task)
    cfg = _cfg(tmp_path)
    res = train(task, FixedPlan(plan), ["p"], cfg, hooks=Hooks(on_step=hook))
    recs = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert recs[1]["reason"] == reason and recs[0]["reason"] is None
    assert res.metrics == recs
    for k in before:
        assert not torch.equal(before[k], snaps[0][k])          # update 1 moved the weights
        assert torch.equal(snaps[0][k], snaps[1][k])            # update 2 left them bit-identical
        assert not torch.equal(snaps[1][k], snaps[2][k])        # update 3 trained again
        assert torch.isfinite(snaps[2][k]).all()
    assert all(p.grad is None for p in task.params.values())


def test_skip_leaves_optimizer_state_untouched(tmp_path):
    task = ToyTask(bad={2: "nan"})
    cfg = _cfg(tmp_path, steps=2)
    train(task, FixedPlan(Plan.full(4)), ["p"], cfg)
    ck = load_checkpoint(latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints")))
    assert ck.step == 2
    assert all(float(s["step"]) == 1 for s in ck.optimizer["state"].values())   # one Adam step taken, not two
    for k, v in task.params.items():
        assert torch.equal(ck.params[k], v.detach())


def test_grad_accumulation_averages_micro_batches(tmp_path):
    """grad_accum=2 with batch 2 gives the mean of the two micro-batch estimates."""
    from halforder.estimators import estimate
    from halforder.training.loop import TrainRNG

    task, plan = ToyTask(), Plan.rlr(4, 2, 2)
    cfg = _cfg(tmp_path, batch_size=2, grad_accum=2, pairing="none")
    est = _one_update(task, plan, task.params, ["a", "b", "c"], cfg, TrainRNG.seeded(0))
    rng = TrainRNG.seeded(0)
    singles = []
    for _ in range(2):
        torch.randint(3, (2,), generator=rng.data)
        chain = task.chain(plan, ["a", "b"], rng.noise)
        singles.append(estimate(chain, plan, task.params, chain.sample_start(2, rng.noise), generator=rng.noise,
                                baseline="loo"))
    for k in task.params:
        assert torch.allclose(est.grad[k], (singles[0].grad[k] + singles[1].grad[k]) / 2, rtol=1e-12, atol=0)
    assert torch.equal(est.reward, torch.cat([s.reward.float() for s in singles]))


@pytest.mark.parametrize("pairing,plan,G", [("auto", Plan.rlr(4, 2, 2), 2), ("auto", Plan.full(4), 1),
                                            ("param+ho", Plan.rlr(4, 2, 2), 4)])
def test_pairing_draws_antithetic_groups_sharing_items_and_starts(tmp_path, pairing, plan, G):
    """A micro-batch of batch_size samples holds batch_size / G groups; each group shares
    its item (prompt) and start state; "auto" pairs plans with ZO steps only."""
    from halforder.estimators import estimate, grouped
    from halforder.training.loop import TrainRNG

    task = ToyTask()
    cfg = _cfg(tmp_path, batch_size=8, pairing=pairing)
    seen = []
    chain_of = task.chain
    task.chain = lambda plan, prompts, generator=None: seen.append(list(prompts)) or chain_of(plan, prompts, generator)
    est = _one_update(task, plan, task.params, ["a", "b", "c"], cfg, TrainRNG.seeded(0))
    assert len(seen[0]) == 8 and seen[0] == grouped(seen[0][::G], G)
    rng = TrainRNG.seeded(0)
    torch.randint(3, (8 // G,), generator=rng.data)
    chain = chain_of(plan, seen[0], rng.noise)
    x_T = grouped(chain.sample_start(8 // G, rng.noise), G)
    ref = estimate(chain, plan, task.params, x_T, generator=rng.noise, baseline="loo",
                   pairing="param" if pairing == "auto" and G == 2 else ("none" if G == 1 else pairing))
    for k in task.params:
        assert torch.equal(est.grad[k], ref.grad[k])


def test_prompt_groups_share_their_prompt_and_pair_inside_the_group(tmp_path):
    """group_size 4 with pairing param: batch 8 is 2 prompts x 4 samples; the antithetic
    groups lie inside a prompt's group, and the leave-one-out baseline acts within it."""
    from halforder.estimators import estimate, grouped
    from halforder.estimators.baselines import LeaveOneOut
    from halforder.training.loop import TrainRNG

    task, plan = ToyTask(), Plan.rlr(4, 2, 2)
    cfg = _cfg(tmp_path, batch_size=8, group_size=4, pairing="param")
    seen = []
    chain_of = task.chain
    task.chain = lambda plan, prompts, generator=None: seen.append(list(prompts)) or chain_of(plan, prompts, generator)
    est = _one_update(task, plan, task.params, ["a", "b", "c"], cfg, TrainRNG.seeded(0))
    assert seen[0] == grouped(seen[0][::4], 4)
    rng = TrainRNG.seeded(0)
    torch.randint(3, (2,), generator=rng.data)
    chain = chain_of(plan, seen[0], rng.noise)
    x_T = grouped(chain.sample_start(4, rng.noise), 2)
    ref = estimate(chain, plan, task.params, x_T, generator=rng.noise, baseline=LeaveOneOut(4), pairing="param")
    for k in task.params:
        assert torch.equal(est.grad[k], ref.grad[k])


def test_pairing_needs_batches_of_whole_groups(tmp_path):
    from halforder.training.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of 4"):
        _cfg(tmp_path, batch_size=6, pairing="param+ho")
    with pytest.raises(ConfigError, match="at least 2 groups"):
        _cfg(tmp_path, batch_size=2, pairing="param")
    assert _cfg(tmp_path, batch_size=2, pairing="param", baseline="none").pairing == "param"


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    root = str(tmp_path / "ck")
    params = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(2))])
    rng = [{"plan": torch.Generator().manual_seed(1).get_state()}]
    for step in (1, 2, 3):
        path = save_checkpoint(root, step, params, {"norm": torch.zeros(3, dtype=torch.float64)},
                               opt.state_dict(), rng, keep=2, evaluations={"forward": 10 * step, "backward": step})
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    os.makedirs(os.path.join(root, ".tmp-step_00000009-x"))     # a crashed write is never picked up
    assert latest_checkpoint(root) == path
    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.num_processes == 1
    assert ck.evaluations == {"forward": 30, "backward": 3}
    assert all(torch.equal(ck.params[k], params[k]) for k in params)
    assert ck.sampler_state["norm"].dtype == torch.float64

    with open(os.path.join(path, "params.safetensors"), "r+b") as f:   # flip one byte
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="corrupted: params.safetensors"):
        load_checkpoint(path)
    older = list_checkpoints(root)[0]
    meta = json.load(open(os.path.join(older, "meta.json")))
    json.dump(dict(meta, format=1), open(os.path.join(older, "meta.json"), "w"))   # written before the count
    with pytest.raises(CheckpointError, match="has format 1, expected 2"):
        load_checkpoint(older)
    os.remove(os.path.join(older, "meta.json"))
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(older)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path):
    task = ToyTask()
    cfg = _cfg(tmp_path, steps=1)
    train(task, FixedPlan(Plan.full(4)), ["p"], cfg)
    other = ToyTask()
    other.params = {"W": other.params["W"]}
    with pytest.raises(CheckpointError, match="other parameters"):
        train(other, FixedPlan(Plan.full(4)), ["p"], _cfg(tmp_path, steps=2, resume="latest"))


@pytest.mark.parametrize("plan", [Plan.full(4), Plan.rlr(4, 2, 2), Plan.truncated(4, 2)])
def test_gradient_checkpointing_leaves_the_estimate_unchanged(plan):
    from halforder.estimators import estimate
    from halforder.estimators.gradient_checkpointing import Checkpointed

    task = ToyTask()
    chain = task.chain(plan, [])
    x_T = chain.sample_start(5, torch.Generator().manual_seed(3))
    plain = estimate(chain, plan, task.params, x_T, generator=torch.Generator().manual_seed(4))
    ckpt = estimate(Checkpointed(chain), plan, task.params, x_T, generator=torch.Generator().manual_seed(4))
    assert torch.equal(plain.reward, ckpt.reward)
    for k in plain.grad:
        assert torch.allclose(plain.grad[k], ckpt.grad[k], rtol=1e-12, atol=1e-14)
        assert plain.grad[k].abs().max() > 0


def test_grpo_advantage_needs_two_samples(tmp_path):
    from halforder.training.config import ConfigError

    with pytest.raises(ConfigError, match="'grpo' advantage"):
        _cfg(tmp_path, batch_size=1, pairing="none", baseline="grpo")
    assert _cfg(tmp_path, batch_size=2, pairing="none", baseline="grpo").baseline == "grpo"


def _one_update(task, plan, params, items, cfg, rng):
    """The one estimate of an on-policy update, as the loop draws it."""
    from halforder.training.update_rules import update_rule
    return next(update_rule(cfg).updates({}, task, plan, params, items, rng))
