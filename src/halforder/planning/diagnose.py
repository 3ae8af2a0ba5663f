"""The measurements of ``halforder diagnose`` on any training task, within a budget of
counted evaluations (docs/why-my-reward-does-not-rise.md).

A pilot draws ``groups`` prompts with ``group`` samples each and keeps every sample's
per-step terms: the pathwise g_t (:func:`~halforder.estimators.theory.step_gradients`) for
the backprop families, the likelihood-ratio score S_t
(:func:`~halforder.estimators.theory.step_scores`) for REINFORCE and GRPO, whose term is
A_n S_{n,t} for any advantage A taken afterwards. From these rows alone come the per-step
shares and the cosine curves of :mod:`.diagnosis`, for the run's own estimator and the
field's variants at every group size. The ratio check rolls a few samples out and recomputes
each step's mean as a training pass would (same batch, other batch compositions), and
reports the gap and the log-ratio it implies at theta = theta_old.

The task is a :class:`~halforder.training.loop.Task` (``trainable()``, ``chain(plan, items,
generator)``) with its number of steps ``T``. The pilot's per-step terms are held in memory: rows x T x P numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..estimators.baselines import GroupNormalised, LeaveOneOut
from ..estimators.compute import ComputeMeter, expected_evaluations
from ..estimators.pairing import grouped
from ..estimators.plan import Plan, Role
from ..estimators.protocol import latent
from ..estimators.rollout import roll_out
from ..estimators.theory import step_gradients, step_scores
from .diagnosis import BatchCurve, StepShares, batch_curve, group_means, step_shares

PATHWISE = ("full", "truncated", "truncated_random")
LIKELIHOOD_RATIO = ("reinforce",)
GROUPS = (2, 4, 8)


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` measured.

    Attributes:
      kind: ``"pathwise"`` or ``"likelihood ratio"``: which per-step term was measured.
      steps: the per-step shares (:class:`~halforder.planning.diagnosis.StepShares`).
      curves: cos(B) of the run's estimator and of the field's variants, by group size.
      cost: evaluations per sample of each curve's estimator (the model's counted calls).
      ratio: precision -> per-step rows of the ratio check (gap and log-ratio by pass).
      pilot: the pilot's size: groups, group, rows.
      spent: evaluations the diagnosis counted (forward + backward); budget: its budget.
    """

    kind: str
    steps: StepShares
    curves: list[BatchCurve]
    cost: dict[str, float]
    ratio: dict[str, list[dict]]
    pilot: dict
    spent: int
    budget: int
    target: float = 0.5


def kind_of(estimator: str) -> str:
    """The per-step term an estimator family is diagnosed with; ``ValueError`` for the others."""
    if estimator in PATHWISE:
        return "pathwise"
    if estimator in LIKELIHOOD_RATIO:
        return "likelihood ratio"
    raise ValueError(f"diagnose measures the backprop families ({', '.join(PATHWISE)}) and REINFORCE/GRPO "
                     f"(reinforce); for {estimator} use halforder plan, which measures its parts' variances")


def pilot_cost(kind: str, T: int, rows: int, ratio_rows: int, precisions: int) -> int:
    """Evaluations a pilot of ``rows`` samples and the ratio check cost: a rollout of T steps
    and the terms' backward pass (2T per row pathwise; a rollout, a recomputation and a
    backward, 3T, for scores), and 4T per row and precision for the ratio check (a rollout and
    three recomputations)."""
    per_row = 2 * T if kind == "pathwise" else 3 * T
    return rows * per_row + precisions * ratio_rows * 4 * T


def coefficients(plan: Plan) -> torch.Tensor:
    """w_t where step t keeps its term (by its role), 0 where the plan drops it."""
    return torch.tensor([w if r is not Role.NONE else 0.0 for r, w in zip(plan.roles, plan.weights)],
                        dtype=torch.float64)


def diagnose(task, sampler, items: Sequence, *, estimator: str, budget: int, group_size: int | None = None,
             baseline: str = "loo", global_std: bool = False, target: float = 0.5, seed: int = 0,
             ratio_tasks: Mapping[str, object] = {}, ratio_rows: int = 4, max_groups: int = 64,
             progress=lambda what: None) -> Diagnosis:
    """Measure a run's estimator on ``task`` (module docstring) within ``budget`` evaluations.

    Args:
      task: the training task; ``sampler``: the run's plan sampler; ``items``: its prompts.
      estimator: the run's family (:data:`PATHWISE` or :data:`LIKELIHOOD_RATIO`).
      group_size, baseline, global_std: the run's groups and advantage.
      target: the cosine for the smallest batch.
      ratio_tasks: precision name -> the task built in that precision, for the ratio check.
      progress: called with a line before each stage.
    """
    kind = kind_of(estimator)
    T = sampler.T
    group = max(group_size or 0, max(GROUPS)) if kind != "pathwise" else 1
    fixed = pilot_cost(kind, T, 0, ratio_rows, len(ratio_tasks))
    per_group = pilot_cost(kind, T, group, 0, 0)
    least, most = (24, 8 * max_groups) if kind == "pathwise" else (3, max_groups)   # observations
    groups = min(most, (budget - fixed) // per_group) if budget > fixed else 0
    if groups < least:
        need = fixed + per_group * least
        raise ValueError(f"a budget of {budget} evaluations is too small for the pilot: it needs at least {need} "
                         f"({least} groups of {group} samples and the ratio check); give a larger budget")
    g = torch.Generator().manual_seed(seed)
    params = {k: v.detach() for k, v in task.trainable().items()}
    with ComputeMeter() as meter:
        progress(f"pilot: {groups} groups of {group} samples")
        idx = torch.randint(len(items), (groups,), generator=g).tolist()
        chain = task.chain(Plan.full(T) if kind == "pathwise" else Plan.reinforce(T),
                           grouped([items[i] for i in idx], group), g)
        x_T = chain.sample_start(groups * group, g)
        if kind == "pathwise":
            terms, R = step_gradients(chain, params, x_T, generator=g)[:2]
        else:
            terms, R = step_scores(chain, params, x_T, generator=g)
        terms, R = terms.double(), R.double()
        ratio = {}
        for name, t in ratio_tasks.items():
            progress(f"ratio check: {name}")
            ratio[name] = ratio_check(t, items, ratio_rows, torch.Generator().manual_seed(seed + 1))
    if kind == "pathwise":
        shares = step_shares(terms)
        curves, cost = _pathwise_curves(terms, sampler, g)
    else:
        adv = _advantage(baseline, group, global_std)(R)
        shares = step_shares(adv[:, None, None] * terms)
        curves, cost = _ratio_curves(terms, R, group, sampler, baseline, global_std, g)
    return Diagnosis(kind, shares, curves, cost, ratio, {"groups": groups, "group": group, "rows": groups * group},
                     meter.forward + meter.backward, budget, target)


def _advantage(baseline: str, group: int, global_std: bool):
    if baseline == "grpo":
        return GroupNormalised(group, "global" if global_std else "group")
    if baseline == "loo":
        return LeaveOneOut(group)
    return lambda R: R


def _drawn(sampler, blocks: int, generator) -> tuple[torch.Tensor, float]:
    """One plan of ``sampler`` per block: their coefficients ``[blocks, T]`` and the mean
    evaluations per sample of the drawn plans."""
    state, coef, cost = sampler.init(), [], 0.0
    for _ in range(blocks):
        plan = sampler.sample(state, generator)
        coef.append(coefficients(plan))
        e = expected_evaluations(plan, 1)
        cost += (e["forward"] + e["backward"]) / blocks
    return torch.stack(coef), cost


def _pathwise_curves(g: torch.Tensor, sampler, generator):
    N, T, _ = g.shape
    truth = g.sum(1)
    coef, cost = _drawn(sampler, N, generator)
    own = torch.einsum("nt,ntp->np", coef, g)
    full = expected_evaluations(Plan.full(T), 1)
    curves = [batch_curve("full backprop", truth, truth, 1, generator=generator)]
    costs = {"full backprop": float(full["forward"] + full["backward"])}
    name = f"the run's: {sampler.sample(sampler.init(), torch.Generator().manual_seed(0))}"
    if name != "the run's: full":
        curves.append(batch_curve(name, own, truth, 1, generator=generator))
        costs[name] = cost
    return curves, costs


def _ratio_curves(S, R, group, sampler, baseline, global_std, generator):
    N, T, _ = S.shape
    reinforce = expected_evaluations(Plan.reinforce(T), 1)
    curves, costs = [], {}
    unbiased = LeaveOneOut(group)(R)[:, None] * S.sum(1)      # per row, over the pilot's whole groups
    for G in sorted({*[x for x in GROUPS if x <= group], group}):
        rows = (N // group) * (group // G) * G
        idx = torch.arange(N).view(N // group, group)[:, :(group // G) * G].reshape(-1)[:rows]
        S_G, R_G = S[idx], R[idx]
        truth = group_means(unbiased[idx], G)
        coef, cost = _drawn(sampler, rows // G, generator)
        variants = {"reinforce, leave-one-out": (LeaveOneOut(G), None),
                    "reinforce, GRPO (group std)": (GroupNormalised(G), None),
                    f"the run's ({baseline}{', global std' if global_std else ''})":
                        (_advantage(baseline, G, global_std), coef)}
        for name, (adv, c) in variants.items():
            A = adv(R_G)
            if c is None:
                est = A[:, None] * S_G.sum(1)
                costs[name] = float(reinforce["forward"] + reinforce["backward"])
            else:
                est = A[:, None] * torch.einsum("nt,ntp->np", c.repeat_interleave(G, 0), S_G)
                costs[name] = cost
            curves.append(batch_curve(name, group_means(est, G), truth, G, generator=generator))
    return curves, costs


def _rows(x, sl):
    return tuple(v[sl] for v in x) if isinstance(x, tuple) else x[sl]


def ratio_check(task, items: Sequence, n: int, generator: torch.Generator) -> list[dict]:
    """Per step t with inherent noise: the gap between the rollout's step mean and the mean a
    training pass recomputes at theta = theta_old, in units of sigma_t (the RMS over the latent's
    entries, the largest over samples), and the log-ratio it implies, <eps, d> / sigma -
    |d|^2 / (2 sigma^2) (the largest |log r| over samples), for three passes: the same batch
    with the weights as autograd leaves (PPO's recomputation here), each half of the batch
    alone, and per-sample weights (the engine's per-sample path)."""
    params = {k: v.detach() for k, v in task.trainable().items()}
    prompts = [items[i % len(items)] for i in range(n)]
    chain = task.chain(Plan.reinforce(task.T), prompts, generator)
    noisy = [t for t in range(1, task.T + 1) if float(chain.sigma(t)) > 0]
    with torch.no_grad():
        out = roll_out(chain, chain.sample_start(n, generator), params, generator=generator, record=noisy)
    halves = [task.chain(Plan.reinforce(task.T), prompts[:max(1, n // 2)], generator),
              task.chain(Plan.reinforce(task.T), prompts[max(1, n // 2):], generator)]
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    per_sample = {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())).requires_grad_() for k, v in params.items()}
    half = max(1, n // 2)
    rows = []
    for t in noisy:
        s = out.steps[t]
        with torch.enable_grad():
            passes = {"same batch": latent(chain.step(t, s.x, leaves)),
                      "half batches": torch.cat([latent(halves[0].step(t, _rows(s.x, slice(0, half)), leaves)),
                                                 latent(halves[1].step(t, _rows(s.x, slice(half, n)), leaves))]),
                      "per-sample weights": latent(chain.step(t, s.x, per_sample))}
        row = {"step": t, "sigma": s.noise.sigma}
        for name, mean in passes.items():
            d = (mean.detach().double() - s.mean.double()).flatten(1)
            eps, sig = s.noise.eps.double().flatten(1), s.noise.sigma
            log_r = (eps * d).sum(1) / sig - d.pow(2).sum(1) / (2 * sig ** 2)
            row[name] = {"gap": float((d.pow(2).mean(1).sqrt() / sig).max()), "log_ratio": float(log_r.abs().max())}
        rows.append(row)
    return rows


def finite(x: float) -> float | None:
    """``x`` for JSON: None where it is not finite."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
