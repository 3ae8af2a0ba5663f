"""Experiment 1: is every estimator family unbiased on the linear chain (T = 50)?

For each plan, n per-sample estimates; the error of their mean against the exact
gradient, its standard error, the largest per-coordinate z-score and Hotelling's T^2
p-value (H0: the mean is the exact gradient). Truncated backprop is included as the
biased control: the test must reject it.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from halforder.estimators import Plan
from halforder.toy import mean_test

from .common import ChainConfig, default_chain, draw, exact_grad_vec, ho_tiling, j_strata, pyplot, save_fig, write_table

ALPHA = 1e-3


def plans(T: int):
    """(label, plans, baseline): the families of docs/design.md (a list = stratified j)."""
    rlr2 = [Plan.rlr(T, 2, j) for j in j_strata(T, 2)]
    two_blocks = Plan.from_roles(["FO", "FO", "HO", "HO"] + ["ZO"] * (T - 6) + ["HO", "HO"],
                                 blocks=[(3, 2), (T - 1, 2)], name="FO2+HO(3,2)+HO(T-1,2)")
    return [
        ("full backprop (FO)", Plan.full(T), None),
        ("truncated K=1", Plan.truncated(T, 1), None),
        ("truncated K=10", Plan.truncated(T, 10), None),
        ("RL / REINFORCE (HO h=1)", Plan.reinforce(T), None),
        ("HO(5) tiling", ho_tiling(T, 5), None),
        ("ZO (evolution strategies)", Plan.zeroth_order(T), None),
        ("RLR h=0", Plan.rlr(T, 0), None),
        ("RLR h=2, j=2", Plan.rlr(T, 2, 2), None),
        ("RLR h=2, j~U(8 values)", rlr2, None),
        ("RLR h=2, j~U, LOO baseline", rlr2, "loo"),
        ("FO2 + two HO blocks + ZO", two_blocks, None),
    ]


def run(out, quick: bool = False) -> dict:
    cfg = ChainConfig()
    chain, params = default_chain(cfg)
    truth = exact_grad_vec(chain, params)
    n, chunk = (2048, 256) if quick else (131072, 8192)
    rows, zs = [], {}
    for label, plan, baseline in tqdm(plans(cfg.T), desc="e1 unbiasedness", leave=False):
        d = draw(chain, params, plan, n, seed=1, chunk=chunk, baseline=baseline, name=label)
        test = mean_test(d.grad, truth)
        err = d.grad.mean(0) - truth
        se = float(np.sqrt(float(d.grad.var(0).sum()) / n))
        unbiased = (plan if isinstance(plan, Plan) else plan[0]).is_unbiased
        zs[label] = test.z
        rows.append([label, "yes" if unbiased else "no", n, float(err.norm()), se, float(np.abs(test.z).max()),
                     test.statistic, test.pvalue, "REJECT" if test.rejects(ALPHA) else "consistent"])
    pre = (f"**Unbiasedness** on the {cfg.describe()}. |grad J| = {float(truth.norm()):.4f} (exact). "
           f"n = {n} per-sample estimates per row (chunks of {chunk}; the LOO baseline is taken within a chunk). "
           "`|mean - grad J|` is the Euclidean error of the mean; `SE` = sqrt(tr Cov / n), its RMS size under H0; "
           "`max |z|` the largest of the 12 per-coordinate z-scores; Hotelling's T^2 tests H0: E[estimate] = grad J "
           f"(12 dof). Verdict at alpha = {ALPHA}: an unbiased row is wrongly rejected with probability {ALPHA}. "
           "`j~U(8 values)`: j uniform on 8 evenly spaced starts in 2..T-1, stratified (n/8 samples each).")
    write_table(out, "e1_unbiasedness", ["estimator", "unbiased plan", "n", "|mean - grad J|", "SE",
                                         "max |z|", "Hotelling T^2", "p", "verdict"], rows, pre)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, (label, z) in enumerate(zs.items()):
        ax.scatter(np.full(len(z), i), z, s=12, label=None)
    ax.axhspan(-3.29, 3.29, color="0.9", zorder=0, label="|z| < 3.29 (two-sided p = 0.001)")
    ax.set_xticks(range(len(zs)), list(zs), rotation=35, ha="right", fontsize=8)
    ax.set_yscale("symlog", linthresh=5)
    ax.set_ylabel("z-score of mean error per coordinate (dimensionless)")
    ax.set_title(f"Mean estimate vs exact gradient, linear chain T={cfg.T}, n={n} per estimator")
    ax.legend(loc="upper right", fontsize=8)
    save_fig(fig, out, "e1_unbiasedness")
    return {"rows": rows}


if __name__ == "__main__":
    from .common import cli, setup

    args = cli(__doc__.splitlines()[0])
    setup()
    run(args.out, args.quick)
