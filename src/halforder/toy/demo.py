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


def check_demo(T: int, d: int, n: int) -> None:
    """``ValueError`` naming the setting of :func:`comparison_table` that cannot work."""
    if T < 6:
        raise ValueError(f"T must be at least 6 for the demo's two-block plan, got {T}")
    if d < 1:
        raise ValueError(f"d (the chain's dimension) must be at least 1, got {d}")
    if n < 2:
        raise ValueError(f"samples must be at least 2 (a variance needs two), got {n}")


def comparison_table(T: int = 8, d: int = 3, n: int = 50_000, seed: int = 0, alpha: float = 1e-3) -> str:
    """A markdown table: for each plan, the error of the mean estimate against the exact
    gradient, Hotelling's p-value, the per-sample variance and the cost model.

    Hotelling's test needs more samples than the P = d^2 + d gradient coordinates (with
    fewer the sample covariance is singular); below that the verdict says so instead of
    testing."""
    check_demo(T, d, n)
    chain, params = linear_chain(T=T, d=d, sigma=0.5, tau=0.2, seed=seed)
    truth = flatten(chain.exact_grad(params))
    testable = n > truth.numel()
    g = torch.Generator().manual_seed(seed)
    rows = [f"Linear-Gaussian chain T={T}, d={d}, sigma_t=0.5, tau_t=0.2 at every step; "
            f"{n} samples per plan; |grad J| = {truth.norm():.3f} (exact).", "",
            "| plan | unbiased plan | abs err of mean | Hotelling p | verdict (alpha=%g) | tr Cov per sample "
            "| graph steps | fwd steps | bwd steps |" % alpha,
            "|---|---|---|---|---|---|---|---|---|"]
    for plan in demo_plans(T):
        s = draw_estimates(chain, plan, params, n, generator=g)
        test = mean_test(s.grad, truth) if testable else None
        cost = plan.cost()
        verdict = ("too few samples to test" if test is None
                   else ("biased, as expected" if not plan.is_unbiased else "biased: unexpected") if test.rejects(alpha)
                   else "consistent" if plan.is_unbiased else "bias not detected at this n")
        pvalue = "n/a" if test is None else f"{test.pvalue:.3g}"
        rows.append(f"| {plan} | {plan.is_unbiased} | {(s.grad.mean(0) - truth).norm():.4f} | {pvalue} "
                    f"| {verdict} | {s.grad.var(0).sum():.4g} | {cost['graph_steps']} | {cost['forward']} "
                    f"| {cost['backward']} |")
    if any(not plan.is_unbiased for plan in demo_plans(T)):
        rows += ["", "Plans whose 'unbiased plan' is False drop steps (truncated backprop: Prop. 6.1), so the test "
                     "should call them biased: they are the negative control that shows the test can see a bias."]
    if not testable:
        rows += ["", f"Too few samples to test: Hotelling's test needs more samples than the {truth.numel()} "
                     f"gradient coordinates (d^2 + d); pass more than {truth.numel()}."]
    return "\n".join(rows)
