"""Gradient estimators for recursive stochastic chains.

    from halforder.estimators import Plan, estimate
    plan = Plan.rlr(T=50, h=2, j=17)
    est = estimate(chain, plan, params, x_T, generator=g)
    est.grad, est.reward, est.parts

:mod:`.protocol` is the chain protocol, :mod:`.plan` the roles and weights, :mod:`.rollout` the
one noise draw and rollout, :mod:`.engine` how each role's estimate is computed,
:mod:`.baselines` the advantages (per-prompt groups), :mod:`.samplers` which plan each
training step uses, :mod:`.step_sets` random step sets, :mod:`.families` each estimator
family once, :mod:`.clipped_ratio` PPO's clipped ratio with reuse and a KL,
:mod:`.draws` many per-sample estimates, :mod:`.pairing` antithetic groups, :mod:`.memory` the activation-memory meter,
:mod:`.compute` the compute meter (model evaluations per sample),
:mod:`.gradient_checkpointing` per-step recomputation, :mod:`.theory` the paper's theory.
The choice of an estimator under budgets is :mod:`halforder.planning`.
"""
from .baselines import leave_one_out
from .compute import ComputeMeter, expected_evaluations
from .draws import Samples, draw_estimates, flatten
from .engine import Estimate, estimate
from .gradient_checkpointing import Checkpointed
from .memory import SavedTensorMeter
from .pairing import PAIRINGS, Pairing, group_means, grouped, pairing_for
from .plan import Plan, Role
from .protocol import Chain, detach, latent, with_latent
from .families import FAMILIES, Family, make_sampler
from .samplers import DropZO, FirstOrderAsZO, FixedPlan, PlanSampler, SoftmaxRLR, UniformRLR, WindowRLR
from .step_sets import RandomSubset, RandomTruncation, RandomWindow

__all__ = ["FAMILIES", "Family", "RandomSubset", "RandomWindow", "PAIRINGS", "Chain", "Checkpointed", "ComputeMeter", "DropZO", "Estimate", "FirstOrderAsZO", "FixedPlan", "Pairing", "Plan", "PlanSampler",
           "RandomTruncation", "Role", "Samples", "SavedTensorMeter", "SoftmaxRLR", "UniformRLR", "WindowRLR", "detach",
           "draw_estimates", "estimate", "expected_evaluations", "flatten", "group_means", "grouped", "latent", "leave_one_out", "make_sampler",
           "pairing_for", "with_latent"]
