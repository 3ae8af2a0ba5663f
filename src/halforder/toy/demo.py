"""The default job: compare every estimator family on an exact linear-Gaussian chain."""
from __future__ import annotations

import torch

from ..estimators import Plan, draw_estimates, flatten
from .linear import linear_chain
from .stats import mean_test


def demo_plans(T: int) -> list[Plan]:
    """The named families plus a two-block plan, for a chain of T >= 6 steps."""
    two_blocks = Plan.from_roles(["FO", "FO", "HO", "HO"] + ["ZO"] * (T - 6) + ["HO", "HO"],
                                 blocks=[(3, 2), (T - 1, 2)], name="FO2+HO(3,2)+HO(T-1,2)")
    return [Plan.full(T), Plan.truncated(T, 2), Plan.reinforce(T), Plan.zeroth_order(T),
            Plan.rlr(T, 0), Plan.rlr(T, 2, 3), two_blocks]


def comparison_table(T: int = 8, d: int = 3, n: int = 50_000, seed: int = 0, alpha: float = 1e-3) -> str:
    """A markdown table: for each plan, the error of the mean estimate against the exact
    gradient, Hotelling's p-value, the per-sample variance and the cost model."""
    chain, params = linear_chain(T=T, d=d, sigma=0.5, tau=0.2, seed=seed)
    truth = flatten(chain.exact_grad(params))
    g = torch.Generator().manual_seed(seed)
    rows = [f"Linear-Gaussian chain T={T}, d={d}, sigma_t=0.5, tau_t=0.2 at every step; "
            f"{n} samples per plan; |grad J| = {truth.norm():.3f} (exact).", "",
            "| plan | unbiased plan | abs err of mean | Hotelling p | verdict (alpha=%g) | tr Cov per sample "
            "| graph steps | fwd steps | bwd steps |" % alpha,
            "|---|---|---|---|---|---|---|---|---|"]
    for plan in demo_plans(T):
        s = draw_estimates(chain, plan, params, n, generator=g)
        test = mean_test(s.grad, truth)
        cost = plan.cost()
        verdict = "biased" if test.rejects(alpha) else "consistent"
        rows.append(f"| {plan} | {plan.is_unbiased} | {(s.grad.mean(0) - truth).norm():.4f} | {test.pvalue:.3g} "
                    f"| {verdict} | {s.grad.var(0).sum():.4g} | {cost['graph_steps']} | {cost['forward']} "
                    f"| {cost['backward']} |")
    return "\n".join(rows)
