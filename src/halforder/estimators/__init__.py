"""Gradient estimators for recursive stochastic chains.

    from halforder.estimators import Plan, estimate
    plan = Plan.rlr(T=50, h=2, j=17)
    est = estimate(chain, plan, params, x_T, generator=g)
    est.grad, est.reward, est.parts

See :mod:`.chain` for the chain protocol, :mod:`.plan` for the roles and
:mod:`.engine` for how each role's estimate is computed.
"""
from .baselines import leave_one_out
from .chain import Chain, detach, latent, with_latent
from .engine import Estimate, estimate
from .plan import Plan, Role
from .samplers import FixedPlan, PlanSampler, SoftmaxRLR, UniformRLR, WindowRLR, make_sampler

__all__ = ["Chain", "Estimate", "FixedPlan", "Plan", "PlanSampler", "Role", "SoftmaxRLR", "UniformRLR", "WindowRLR",
           "detach", "estimate", "latent", "leave_one_out", "make_sampler", "with_latent"]
