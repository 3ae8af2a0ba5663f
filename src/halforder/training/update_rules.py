"""Update rules: how one loop step turns a plan into the estimates the optimiser applies.

The training loop asks its rule for the estimates of one step and applies each in turn:

    state = rule.init(params)                               # checkpointed with the loop
    for est in rule.updates(state, task, plan, params, items, rng):
        apply est.grad with the optimiser                   # one optimiser update each

:class:`OnPolicy` yields one estimate per step (:func:`~halforder.estimators.estimate` on
each micro-batch). :class:`ClippedRatio` records the step's rollout once and yields
``updates`` estimates of PPO's clipped surrogate on it, the later ones off-policy, with a
KL penalty to the parameters the run started from
(:mod:`~halforder.estimators.clipped_ratio`).

Both draw the batch alike: ``batch_size / group`` items per micro-batch, each repeated for
the ``group`` samples that share it (a prompt's group, or an antithetic group), and the
start states in antithetic groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol, Sequence

import torch

from ..estimators import Estimate, Plan, estimate, grouped, pairing_for
from ..estimators.baselines import GroupNormalised, LeaveOneOut, named_baseline
from ..estimators.clipped_ratio import check_reusable, clipped_surrogate, record

State = dict[str, torch.Tensor]


class UpdateRule(Protocol):
    """Structural type of an update rule (module docstring)."""

    def init(self, params: Mapping[str, torch.Tensor]) -> State: ...

    def describe(self, plan: Plan) -> dict: ...

    def updates(self, state: State, task, plan: Plan, params, items: Sequence, rng) -> Iterator[Estimate]: ...


@dataclass(frozen=True)
class Draws:
    """How a step's samples are drawn and weighed: ``grad_accum`` micro-batches of
    ``batch_size`` samples, in prompt groups of ``group_size`` (None: every sample its own
    item), antithetic ``pairing`` (a name, or ``"auto"``), and ``baseline`` ``"loo"``,
    ``"grpo"`` (with the batch's std where ``global_std``) or ``"none"``."""

    batch_size: int
    grad_accum: int = 1
    group_size: int | None = None
    pairing: str = "none"
    baseline: str = "loo"
    global_std: bool = False

    def describe(self, plan: Plan) -> dict:
        """What a training record shows of the draws: the pairing the plan gets."""
        return {"pairing": pairing_for(self.pairing, plan).name}

    def advantage(self):
        """The baseline as a value (:mod:`~halforder.estimators.baselines`), within the prompt groups."""
        name = named_baseline(self.baseline)
        if name is None:
            return None
        return {"loo": LeaveOneOut(self.group_size),
                "grpo": GroupNormalised(self.group_size, "global" if self.global_std else "group")}[name]

    def micro_batches(self, task, plan: Plan, items: Sequence, rng):
        """``(chain, x_T, pairing)`` for each micro-batch: items drawn with ``rng.data``,
        noise with ``rng.noise``."""
        pairing = pairing_for(self.pairing, plan)
        G = pairing.size
        group = self.group_size or G
        for _ in range(self.grad_accum):
            idx = torch.randint(len(items), (self.batch_size // group,), generator=rng.data)
            chain = task.chain(plan, grouped([items[i] for i in idx.tolist()], group), rng.noise)
            yield chain, grouped(chain.sample_start(self.batch_size // G, rng.noise), G), pairing


@dataclass(frozen=True)
class OnPolicy:
    """One estimate per step, of any plan: the mean over micro-batches of
    :func:`~halforder.estimators.estimate`."""

    draws: Draws

    def init(self, params) -> State:
        return {}

    def describe(self, plan: Plan) -> dict:
        return self.draws.describe(plan)

    def updates(self, state: State, task, plan: Plan, params, items: Sequence, rng) -> Iterator[Estimate]:
        ests = [estimate(chain, plan, params, x_T, generator=rng.noise, baseline=self.draws.advantage(),
                         pairing=pairing)
                for chain, x_T, pairing in self.draws.micro_batches(task, plan, items, rng)]
        yield mean_estimate(ests)


@dataclass(frozen=True)
class ClippedRatio:
    """PPO on a recorded rollout: ``updates`` estimates per step of the clipped surrogate
    (``clip_range`` None: no clipping), each over every micro-batch of the rollout, with the
    KL to the starting parameters weighted by ``kl_beta``. Needs plans of single-step
    likelihood ratios (estimator reinforce)."""

    draws: Draws
    clip_range: float | None = None
    updates_per_rollout: int = 1
    kl_beta: float = 0.0

    def describe(self, plan: Plan) -> dict:
        return self.draws.describe(plan)

    def init(self, params) -> State:
        return {f"reference.{k}": v.detach().clone() for k, v in params.items()} if self.kl_beta else {}

    def updates(self, state: State, task, plan: Plan, params, items: Sequence, rng) -> Iterator[Estimate]:
        check_reusable(plan)
        reference = {k: state[f"reference.{k}"] for k in params} if self.kl_beta else None
        rollouts = [record(chain, plan, params, x_T, generator=rng.noise, baseline=self.draws.advantage(),
                           pairing=pairing)
                    for chain, x_T, pairing in self.draws.micro_batches(task, plan, items, rng)]
        for _ in range(self.updates_per_rollout):
            yield mean_estimate([clipped_surrogate(r, params, clip_range=self.clip_range, kl_beta=self.kl_beta,
                                                   reference=reference) for r in rollouts])


def update_rule(cfg) -> OnPolicy | ClippedRatio:
    """The rule a :class:`~halforder.training.config.LoopConfig` asks for: the clipped ratio
    where it sets a clip range, reuse or a KL, on-policy estimates otherwise."""
    draws = Draws(cfg.batch_size, cfg.grad_accum, cfg.group_size, cfg.pairing, cfg.baseline, cfg.global_std)
    if cfg.clip_range is None and cfg.updates_per_rollout == 1 and not cfg.kl_beta:
        return OnPolicy(draws)
    return ClippedRatio(draws, cfg.clip_range, cfg.updates_per_rollout, cfg.kl_beta)


def mean_estimate(ests: Sequence[Estimate]) -> Estimate:
    """The mean of estimates of equal batch size (rewards concatenated; stats averaged)."""
    mean = (lambda ds: {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]})
    return Estimate(mean([e.grad for e in ests]), torch.cat([e.reward.float() for e in ests]),
                    {r: mean([e.parts[r] for e in ests]) for r in ests[0].parts},
                    {k: sum(e.stats[k] for e in ests) / len(ests) for k in ests[0].stats})
