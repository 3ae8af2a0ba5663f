"""Experiment 3: the structural bias of truncated backprop (Prop. 6.1) against K.

Exact: bias(K) = sum_{t > K} grad_{theta_t} J from the linear chain's per-step gradients.
Measured: grad J - mean of n truncated-K estimates, with Hotelling's test of
E[truncated-K] = grad J - bias(K) (the formula) and of E[truncated-K] = grad J (no bias).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from halforder.estimators import Plan, flatten, theory
from halforder.toy import mean_test

from .common import Z95, ChainConfig, default_chain, draw, exact_grad_vec, pyplot, save_fig, write_table

ALPHA = 1e-3


def run(out, quick: bool = False) -> dict:
    cfg = ChainConfig()
    chain, params = default_chain(cfg)
    truth = exact_grad_vec(chain, params)
    norms, rel, total = theory.truncation_bias_curve(chain, params)
    Ks = (1, 2, 5, 20, 50) if quick else tuple(range(1, cfg.T + 1))
    n, chunk = (1024, 512) if quick else (32768, 8192)
    rows, meas, floor = [], [], []
    for K in tqdm(Ks, desc="e3 truncation K", leave=False):
        d = draw(chain, params, Plan.truncated(cfg.T, K), n, seed=4, chunk=chunk)
        bias = flatten(theory.truncation_bias(chain, params, K))
        m = truth - d.grad.mean(0)
        noise = float(np.sqrt(float(d.grad.var(0).sum()) / n))
        p_formula = mean_test(d.grad, truth - bias).pvalue
        p_nobias = mean_test(d.grad, truth).pvalue
        meas.append(float(m.norm()))
        floor.append(noise)
        rows.append([K, n, norms[K - 1], float(m.norm()), noise, rel[K - 1], float(m.norm()) / total,
                     p_formula, p_nobias])
    pre = (f"**Truncation bias** (Prop. 6.1) on the {cfg.describe()}; |grad J| = {total:.4f}. "
           f"n = {n} truncated-K estimates per K (same x_T and noise for every K). `noise` = sqrt(tr Cov / n), "
           "the RMS error of the measured bias vector under the formula. `p formula`: Hotelling test of "
           "E[truncated-K] = grad J - bias(K); `p no bias`: of E[truncated-K] = grad J. "
           f"Each test's false-rejection rate is {ALPHA} at alpha = {ALPHA}.")
    write_table(out, "e3_truncation", ["K", "n", "|bias| exact", "|bias| measured", "noise (RMS)", "relative exact",
                                       "relative measured", "p formula", "p no bias"], rows, pre)
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    Kall = np.arange(1, cfg.T + 1)
    ax1.plot(Kall[:-1], norms[:-1], "-", color="C0", label="exact, Prop. 6.1")
    ax1.errorbar(Ks, np.maximum(meas, 1e-12), yerr=Z95 * np.array(floor), fmt="o", ms=3, color="C1", capsize=2,
                 label=f"measured |grad J - mean| (n={n}, ±1.96 RMS noise)")
    ax1.plot(Ks, floor, ":", color="0.5", label="noise floor sqrt(tr Cov / n)")
    ax1.set_yscale("log")
    ax1.set_xlabel("K, steps backpropagated (truncated backprop)")
    ax1.set_ylabel("|bias| (reward / parameter units)")
    ax1.set_title(f"Truncation bias vs K, linear chain T={cfg.T}")
    ax1.legend(fontsize=8)
    ax2.plot(Kall, rel, "-o", ms=2, label="exact |bias| / |grad J|")
    ax2.plot(Ks, np.array(meas) / total, "x", color="C1", label="measured")
    ax2.set_xlabel("K, steps backpropagated")
    ax2.set_ylabel("relative bias |bias(K)| / |grad J| (fraction)")
    ax2.set_title("Relative bias, K = 1..T")
    ax2.legend(fontsize=8)
    save_fig(fig, out, "e3_truncation")
    return {"relative": {K: rel[K - 1] for K in Ks}, "rows": rows}


if __name__ == "__main__":
    from .common import cli, setup

    args = cli(__doc__.splitlines()[0])
    setup()
    run(args.out, args.quick)
