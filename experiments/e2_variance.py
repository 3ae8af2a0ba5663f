"""Experiment 2: variance ordering of the estimators, and where Prop. 6.2 fails.

(a) Per-sample variance (trace of the covariance) of FO, HO(h) for several h, RL, ZO and
RLR on the default chain, all from the same x_T and noise (common random numbers), so
the ratios to FO have tight paired CIs.
(b) Prop. 6.2 claims Var(FO) <= Var(likelihood ratio). On the same chain with tau = 0
(so x_0 is Gaussian and the exact gradient exists) and R(x) = cos(k <a, x>), sweep k:
the pathwise integrand carries a factor k, the likelihood-ratio one does not, so FO
loses for large k.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from halforder.estimators import Plan, flatten
from halforder.toy import Cosine, LinearGaussianChain, mean_test

from .common import (ChainConfig, default_chain, draw, fmt, ho_tiling, j_strata, pyplot, ratio_ci, save_fig,
                     trace_var, write_table)


def variance_plans(T: int):
    """(label, plans, baseline) for part (a); also used by experiment 6."""
    rlr = lambda h: [Plan.rlr(T, h, j) for j in j_strata(T, h)]  # noqa: E731
    return [
        ("FO (full backprop)", Plan.full(T), None),
        ("HO(49): FO1 + one block 2..50", ho_tiling(T, 49), None),
        ("HO(10) tiling", ho_tiling(T, 10), None),
        ("HO(5) tiling", ho_tiling(T, 5), None),
        ("HO(2) tiling", ho_tiling(T, 2), None),
        ("HO(1): FO1 + RL", ho_tiling(T, 1), None),
        ("RL (REINFORCE)", Plan.reinforce(T), None),
        ("RL + LOO", Plan.reinforce(T), "loo"),
        ("RLR h=10, j~U", rlr(10), None),
        ("RLR h=2, j~U", rlr(2), None),
        ("RLR h=2, j~U + LOO", rlr(2), "loo"),
        ("RLR h=0", Plan.rlr(T, 0), None),
        ("ZO (evolution strategies)", Plan.zeroth_order(T), None),
        ("ZO + LOO", Plan.zeroth_order(T), "loo"),
    ]


def measure(chain, params, entries, n, chunk, seed=2, desc="variance"):
    """label -> (TraceVar, plan or plans, baseline) for the given entries, paired draws."""
    res = {}
    for label, plan, baseline in tqdm(entries, desc=desc, leave=False):
        d = draw(chain, params, plan, n, seed=seed, chunk=chunk, baseline=baseline, name=label)
        res[label] = (trace_var(d.grad), plan, baseline)
    return res


def cosine_chain(cfg: ChainConfig, k: float):
    """The default chain's W, b and x_T with tau = 0 and R(x) = cos(k <a, x>), |a| = 1."""
    base, params = default_chain(cfg)
    a = torch.ones(cfg.d, dtype=torch.float64) / cfg.d ** 0.5
    return LinearGaussianChain(cfg.T, cfg.d, cfg.sigma, 0.0, Cosine(a, k), base.x_T_mean), params


def run(out, quick: bool = False) -> dict:
    cfg = ChainConfig()
    chain, params = default_chain(cfg)
    n, chunk = (1024, 128) if quick else (65536, 8192)
    res = measure(chain, params, variance_plans(cfg.T), n, chunk, desc="e2a variance")
    fo = res["FO (full backprop)"][0]
    rows = []
    for label, (tv, _, baseline) in res.items():
        r, lo, hi = ratio_ci(tv, fo, paired=True)
        rows.append([label, n, tv.value, tv.lo, tv.hi, r, lo, hi])
    pre = (f"**Variance ordering** on the {cfg.describe()}. tr Cov of one per-sample estimate, "
           f"n = {n} samples per row, all rows from the same x_T and noise (common random numbers). "
           "95% CI: normal approximation for the mean of |g_i - mean g|^2; ratio CI: delta method on the log, "
           "with the covariance of the paired rows. `j~U`: j uniform on 8 evenly spaced starts (stratified). "
           "LOO: leave-one-out baseline within chunks of "
           f"{chunk}. HO(h): FO on step 1, HO blocks of length h tiling steps 2..{cfg.T}.")
    write_table(out, "e2_variance", ["estimator", "n", "tr Var", "CI low", "CI high", "ratio to FO",
                                     "ratio CI low", "ratio CI high"], rows, pre)

    # (b) Prop. 6.2 counterexample: high-frequency cosine, tau = 0
    ks = (0.5, 2.0, 8.0) if quick else (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    nb, chunkb = (1024, 256) if quick else (32768, 8192)
    rows_b, curves = [], {"FO (full backprop)": [], "RL (REINFORCE)": [], "HO(5) tiling": []}
    for k in tqdm(ks, desc="e2b cosine k", leave=False):
        cchain, cparams = cosine_chain(cfg, k)
        truth = flatten(cchain.exact_grad(cparams))
        tvs = {}
        for label, plan in (("FO (full backprop)", Plan.full(cfg.T)), ("RL (REINFORCE)", Plan.reinforce(cfg.T)),
                            ("HO(5) tiling", ho_tiling(cfg.T, 5))):
            d = draw(cchain, cparams, plan, nb, seed=3, chunk=chunkb, name=label)
            tvs[label] = tv = trace_var(d.grad)
            curves[label].append(tv)
            p = mean_test(d.grad, truth).pvalue
            rows_b.append([k, label, nb, tv.value, tv.lo, tv.hi, p])
        r, lo, hi = ratio_ci(tvs["FO (full backprop)"], tvs["RL (REINFORCE)"], paired=True)
        rows_b.append([k, "ratio FO / RL", nb, r, lo, hi, None])
    pre_b = ("**Prop. 6.2 counterexample.** Same W, b, x_T as above but tau_t = 0 (x_0 Gaussian, exact gradient "
             "known) and R(x) = cos(k <a, x>), a = (1,1,1)/sqrt(3). "
             f"n = {nb} paired samples per row; 95% CIs as above; p: Hotelling test of unbiasedness "
             "against the exact gradient (all three plans are unbiased).")
    write_table(out, "e2_prop62_cosine", ["k", "estimator", "n", "tr Var", "CI low", "CI high", "Hotelling p"],
                rows_b, pre_b)

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.25, 1]})
    labels = list(res)
    vals = np.array([res[k][0].value for k in labels])
    err = np.array([[res[k][0].value - res[k][0].lo, res[k][0].hi - res[k][0].value] for k in labels]).T
    colors = ["C0" if "FO (" in k else "C2" if k.startswith("HO") else "C1" if k.startswith("RL ") or k.startswith("RL+")
              else "C3" if k.startswith("RLR") else "C4" for k in labels]
    ax1.barh(range(len(labels)), vals, xerr=err, color=colors, capsize=3)
    ax1.set_yticks(range(len(labels)), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("tr Cov of one per-sample gradient estimate (reward units² / param units²)")
    ax1.set_title(f"(a) Variance on the linear chain T={cfg.T} (n={n}, 95% CI)")
    for i, v in enumerate(vals):
        ax1.text(v * 1.15, i, f"{fmt(v / fo.value, 3)}x FO", va="center", fontsize=7)
    for label, tvs in curves.items():
        v = np.array([t.value for t in tvs])
        ax2.errorbar(ks, v, yerr=np.array([[t.value - t.lo, t.hi - t.value] for t in tvs]).T, marker="o",
                     capsize=3, label=label)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("reward frequency k in R = cos(k <a, x>) (1 / x units)")
    ax2.set_ylabel("tr Cov of one per-sample estimate")
    ax2.set_title(f"(b) Prop. 6.2 fails for high frequency (tau=0, n={nb})")
    ax2.legend(fontsize=8)
    save_fig(fig, out, "e2_variance")
    ratios = {label: ratio_ci(res[label][0], fo, paired=True) for label in res}
    cross = [(k, ratio_ci(f, r, paired=True)) for k, f, r in zip(ks, curves["FO (full backprop)"],
                                                                 curves["RL (REINFORCE)"])]
    return {"ratios_to_fo": ratios, "fo_over_rl_by_k": cross, "measured": res}


if __name__ == "__main__":
    from .common import cli, setup

    args = cli(__doc__.splitlines()[0])
    setup()
    run(args.out, args.quick)
