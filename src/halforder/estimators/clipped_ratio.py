"""The policy-gradient recipe of DDPO and Flow-GRPO: a rollout recorded once, then U updates
on it with PPO's clipped per-step importance ratio, and a KL penalty to a reference model.

For a plan whose terms are likelihood ratios at single steps (REINFORCE on all steps or on
a set; HO blocks of length 1, no FO or ZO step), step t's transition is Gaussian,
x_{t-1} = mu_theta(x_t) + sigma_t eps_t. With d = mu_theta(x_t) - mu_old(x_t) at the
recorded x_t, the per-step log-ratio follows from the drawn noise,

    log r_t = log p_theta(x_{t-1} | x_t) - log p_old(x_{t-1} | x_t) = <eps_t, d> / sigma_t - |d|^2 / (2 sigma_t^2),

so r_t = 1 exactly where theta = theta_old (d = 0): no difference of two large
log-densities is formed. PPO's clipped surrogate per sample and step,

    min(r_t A, clip(r_t, 1 - eps, 1 + eps) A),

has the gradient A grad r_t where the ratio is not clipped (r_t within 1 +- eps, or on the
side the advantage pulls away from) and 0 where it is. At r_t = 1 this is
A <D_theta mu, eps_t> / sigma_t, the engine's REINFORCE term (plan.py, role HO with h = 1).

The KL penalty to the reference parameters, on the steps the plan trains, is per step
|mu_theta(x_t) - mu_ref(x_t)|^2 / (2 sigma_t^2) for Gaussian steps of equal sigma; its
gradient is taken at the recorded states, as Flow-GRPO and DDPO take it (the path KL's
dependence through the law of x_t is left out: docs/field-estimators.md measures that).
Each step's terms carry its plan weight. Where the chain puts parameter noise on a trained
step, the step is recomputed at the recorded perturbed parameters, as the engine's HO term is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .baselines import Baseline, advantage
from .engine import Estimate, _grad, _Named, gradient_leaves, weighted
from .pairing import Pairing
from .plan import Plan, Role
from .protocol import latent
from .rollout import Rollout, perturb, roll_out


@dataclass(frozen=True)
class Recorded:
    """A rollout recorded for reuse: the chain and plan it ran, its :class:`Rollout` (each
    trained step's input, noise and mean under the sampling parameters), the rewards ``[N]``
    and the advantages ``[N]``."""

    chain: object
    plan: Plan
    rollout: Rollout
    reward: torch.Tensor
    advantage: torch.Tensor

    def log_density(self) -> dict[int, torch.Tensor]:
        """Step t -> log p_old(x_{t-1} | x_t) per sample under the sampling parameters."""
        return {t: s.log_density() for t, s in self.rollout.steps.items()}


def check_reusable(plan: Plan) -> None:
    """``ValueError`` unless ``plan`` is made of single-step likelihood ratios (HO blocks of
    length 1, the other steps NONE): the ratio and its reuse are defined for those only."""
    if plan.fo_steps or plan.steps(Role.ZO) or any(h != 1 for _, h in plan.blocks):
        raise ValueError(f"the clipped ratio reuses rollouts of likelihood-ratio steps only (estimator reinforce); "
                         f"plan {plan} has first-order, zeroth-order or longer half-order steps")


def record(chain, plan: Plan, params: Mapping[str, torch.Tensor], x_T, *, generator: torch.Generator | None = None,
           baseline: Baseline = None, pairing: str | Pairing | None = None) -> Recorded:
    """Roll ``chain`` out once under ``params`` (the sampling parameters theta_old) with the
    engine's draws, recording every trained step, and weigh the rewards by ``baseline``
    (:func:`~halforder.estimators.baselines.advantage`)."""
    check_reusable(plan)
    pairing = Pairing.parse(pairing)
    frozen = _Named({k: v.detach() for k, v in params.items()})
    with torch.no_grad():
        out = roll_out(chain, x_T, frozen, generator=generator, pairing=pairing,
                       mirrored={j for j, _ in plan.blocks}, record=plan.steps(Role.HO), shapes=params)
        R = chain.reward(latent(out.x)).detach()
    return Recorded(chain, plan, out, R, advantage(R, baseline, pairing.size))


def surrogate_evaluations(plan: Plan, n: int, *, updates: int = 1, kl: bool = False) -> dict[str, int]:
    """The evaluations that :func:`record` and ``updates`` passes of :func:`clipped_surrogate` cost
    on ``n`` samples: a rollout of T steps without gradients, then per pass each trained step
    recomputed and backpropagated once, and evaluated once more at the reference where ``kl``."""
    check_reusable(plan)
    k = len(plan.steps(Role.HO))
    return {"forward": n * (plan.T + updates * k * (2 if kl else 1)), "backward": n * updates * k}


def clipped_surrogate(recorded: Recorded, params: Mapping[str, torch.Tensor], *, clip_range: float | None = None,
                      kl_beta: float = 0.0, reference: Mapping[str, torch.Tensor] | None = None,
                      per_sample: bool = False) -> Estimate:
    """The gradient of PPO's clipped surrogate minus ``kl_beta`` times the KL to ``reference``,
    at ``params``, on a :class:`Recorded` rollout (module docstring). ``clip_range`` None: no
    clipping. ``Estimate.parts["HO"]`` is the whole estimate (the KL's gradient taken in the
    same backward pass); ``Estimate.stats`` holds the ratio's mean, the clip fraction, the mean KL per sample and
    the mean of (log r)^2 / 2 (Flow-GRPO's ``approx_kl``); the KL where ``kl_beta`` > 0."""
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if kl_beta and reference is None:
        raise ValueError("a KL penalty needs the reference parameters")
    chain, plan, A = recorded.chain, recorded.plan, recorded.advantage
    N = A.shape[0]
    leaves = gradient_leaves(params, N if per_sample else None)
    policy = torch.zeros((N,), dtype=A.dtype, device=A.device)
    kl = torch.zeros_like(policy)
    ratios, clipped, log2 = [], [], []
    with torch.enable_grad():
        for t in plan.steps(Role.HO):
            s = recorded.rollout.steps[t]
            mean = latent(chain.step(t, s.x, perturb(weighted(leaves, plan.weight(t)), s.noise.dtheta)))
            d = (mean - s.mean).flatten(1)
            eps, sig = s.noise.eps.flatten(1), s.noise.sigma
            log_r = (eps * d).sum(1) / sig - d.pow(2).sum(1) / (2 * sig ** 2)
            r = torch.exp(log_r)
            out = torch.zeros_like(r, dtype=torch.bool)
            if clip_range is not None:
                out = ((A > 0) & (r.detach() > 1 + clip_range)) | ((A < 0) & (r.detach() < 1 - clip_range))
            policy = policy + (A * ~out) * r
            ratios.append(r.detach())
            clipped.append(out)
            log2.append(log_r.detach().pow(2) / 2)
            if kl_beta:
                with torch.no_grad():
                    ref = latent(chain.step(t, s.x, perturb(_Named(dict(reference)), s.noise.dtheta)))
                kl = kl + (mean - ref).flatten(1).pow(2).sum(1) / (2 * sig ** 2)
        reduce = (lambda g: g) if per_sample else (lambda g: g / N)
        grad = _grad((policy - kl_beta * kl).sum(), leaves, reduce)   # one backward pass for both terms
    zeros = {k: torch.zeros_like(v) for k, v in grad.items()}
    ratio = torch.cat(ratios) if ratios else policy.new_ones(1)
    stats = {"ratio_mean": float(ratio.mean()), "ratio_max_deviation": float((ratio - 1).abs().max()),
             "clip_fraction": float(torch.cat(clipped).double().mean()) if clipped else 0.0,
             "approx_kl": float(torch.cat(log2).mean()) if log2 else 0.0}
    if kl_beta:
        stats["kl"] = float(kl.detach().mean())
    return Estimate(grad=grad, reward=recorded.reward, parts={"FO": zeros, "HO": grad, "ZO": dict(zeros)},
                    stats=stats)
