"""Experiment 7: antithetic pairing of the likelihood-ratio parts, at equal compute.

Samples are drawn in groups that share x_T and every inherent noise, with the parameter
noise mirrored ("param", pairs), the noise where HO blocks end mirrored ("ho", pairs), or
both ("param+ho", groups of 4); see halforder.estimators.pairing. A row is the mean of a
group of G samples, so G x (tr Cov of a row) is the variance *per chain evaluation*: the
number to compare with an unpaired estimator's per-sample variance at equal compute.

(a) The default chain (T = 50, quadratic reward, exact gradient): ZO, RLR h = 0, RLR h = 2
    (j stratified), REINFORCE and full backprop, by role, with each pairing; Hotelling's
    test of each against the exact gradient.
(b) R(x) = cos(k <a, x>) on the same chain (tau = 0.1 kept: ZO needs parameter noise),
    k = 1..16: ZO and RLR h = 2, unpaired against paired.
(c) The gain against tau: pairing cancels the part of Var(R) that the inherent noise
    causes, so it gains most when tau is small against the inherent noise (the diffusion
    regime: tau = 1e-3 on LoRA weights). ZO and RLR h = 2 at tau = 0.1, 0.03, 0.01, 0.003.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from halforder.estimators import PAIRINGS, Pairing, Plan, draw_estimates, flatten
from halforder.toy import Cosine, LinearGaussianChain, mean_test

from .common import ChainConfig, default_chain, j_strata, pyplot, save_fig, trace_var, write_table

ROLES = ("FO", "HO", "ZO")


def plans(T: int) -> list[tuple[str, list[Plan]]]:
    return [("ZO", [Plan.zeroth_order(T)]), ("RLR h=0", [Plan.rlr(T, 0)]),
            ("RLR h=2, j~U", [Plan.rlr(T, 2, j) for j in j_strata(T, 2)]),
            ("REINFORCE", [Plan.reinforce(T)]), ("full backprop", [Plan.full(T)])]


def measure(chain, params, plan_list, pairing: str, evaluations: int, chunk: int, seed: int, baseline="loo"):
    """(rows of grad [n, P], rows of each role's part) for ``evaluations`` chain evaluations:
    n = evaluations / G group means, strata of j cycled by chunk."""
    G = Pairing.parse(pairing).size
    n, m = evaluations // G, chunk // G
    g = torch.Generator().manual_seed(seed)
    grads, parts = [], {r: [] for r in ROLES}
    for i in range(n // m):
        s = draw_estimates(chain, plan_list[i % len(plan_list)], params, m, generator=g, chunk=m, baseline=baseline,
                           pairing=pairing)
        grads.append(s.grad)
        for r in ROLES:
            parts[r].append(s.parts[r])
    return torch.cat(grads), {r: torch.cat(v) for r, v in parts.items()}


def per_evaluation(x: torch.Tensor, pairing: str) -> float:
    """G x tr Cov of the rows: the variance per chain evaluation."""
    return Pairing.parse(pairing).size * trace_var(x).value


def run(out, quick: bool = False) -> dict:
    cfg = ChainConfig()
    chain, params = default_chain(cfg)
    truth = flatten(chain.exact_grad(params))
    evals, chunk = (1024, 128) if quick else (131072, 8192)
    rows, table = [], {}
    for label, plan_list in tqdm(plans(cfg.T), desc="e7a pairing", leave=False):
        for pairing in PAIRINGS:
            grad, parts = measure(chain, params, plan_list, pairing, evals, chunk, seed=7)
            tv = trace_var(grad)
            G = Pairing.parse(pairing).size
            table[(label, pairing)] = G * tv.value
            rows.append([label, pairing, G, grad.shape[0], G * tv.value, G * tv.lo, G * tv.hi,
                         *(per_evaluation(parts[r], pairing) for r in ROLES), mean_test(grad, truth).pvalue])
    for r in rows:
        r.insert(7, table[(r[0], "none")] / r[4])
    pre = (f"**Antithetic pairing at equal compute** on the {cfg.describe()}. Each row: {evals} chain evaluations, "
           "i.e. n = evaluations / G group means (G = 1, 2 or 4 samples per group). `var/eval` = G x tr Cov of a "
           "group mean, the variance per chain evaluation (95% CI: normal approximation for the mean of "
           "|g_i - mean g|^2, times G); `gain` = unpaired var/eval over this row's; the role columns are the same "
           f"for each part alone. Leave-one-out baseline over the other groups of a chunk of {chunk} evaluations. "
           "`j~U`: j uniform on 8 evenly spaced starts. p: Hotelling's test of the mean against the exact gradient.")
    write_table(out, "e7_pairing", ["plan", "pairing", "G", "n groups", "var/eval", "CI low", "CI high", "gain",
                                    "FO var/eval", "HO var/eval", "ZO var/eval", "Hotelling p"], rows, pre)

    ks = (1.0, 4.0, 16.0) if quick else (1.0, 2.0, 4.0, 8.0, 16.0)
    evals_b, chunk_b = (512, 128) if quick else (65536, 8192)
    a = torch.ones(cfg.d, dtype=torch.float64) / cfg.d ** 0.5
    rows_b, curves = [], {}
    for k in tqdm(ks, desc="e7b cosine k", leave=False):
        cchain = LinearGaussianChain(cfg.T, cfg.d, cfg.sigma, cfg.tau, Cosine(a, k), chain.x_T_mean)
        for label, plan_list in plans(cfg.T)[:3]:
            for pairing in ("none", "param", "param+ho") if label == "RLR h=2, j~U" else ("none", "param"):
                grad, parts = measure(cchain, params, plan_list, pairing, evals_b, chunk_b, seed=8)
                v = per_evaluation(grad, pairing)
                curves.setdefault((label, pairing), []).append(v)
                rows_b.append([k, label, pairing, v, *(per_evaluation(parts[r], pairing) for r in ROLES)])
    pre_b = (f"**Pairing under high-frequency rewards.** Same chain (tau = {cfg.tau} kept: ZO needs parameter noise), "
             "R(x) = cos(k <a, x>), a = (1,1,1)/sqrt(3). var/eval as above, "
             f"{evals_b} chain evaluations per row (no exact gradient here: x_0 is not Gaussian when tau > 0; "
             "unbiasedness is checked in the first table).")
    write_table(out, "e7_pairing_cosine", ["k", "plan", "pairing", "var/eval", "FO var/eval", "HO var/eval",
                                           "ZO var/eval"], rows_b, pre_b)

    taus = (0.1, 0.01) if quick else (0.1, 0.03, 0.01, 0.003)
    rows_c, gains = [], {}
    for tau in tqdm(taus, desc="e7c tau", leave=False):
        tchain = LinearGaussianChain(cfg.T, cfg.d, cfg.sigma, tau, chain.reward_fn, chain.x_T_mean)
        ttruth = flatten(tchain.exact_grad(params))
        for label, plan_list in (plans(cfg.T)[0], plans(cfg.T)[2]):
            v = {}
            for pairing in ("none", "param"):
                grad, parts = measure(tchain, params, plan_list, pairing, evals_b, chunk_b, seed=9)
                v[pairing] = per_evaluation(grad, pairing)
                rows_c.append([tau, label, pairing, v[pairing], per_evaluation(parts["ZO"], pairing),
                               mean_test(grad, ttruth).pvalue])
            gains.setdefault(label, []).append(v["none"] / v["param"])
    pre_c = ("**The gain of pairing against tau** on the default chain and reward, "
             f"{evals_b} chain evaluations per row; p: Hotelling's test against the exact gradient.")
    write_table(out, "e7_pairing_tau", ["tau", "plan", "pairing", "var/eval", "ZO var/eval", "Hotelling p"],
                rows_c, pre_c)

    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.8))
    labels = [label for label, _ in plans(cfg.T)]
    width = 0.2
    for i, pairing in enumerate(PAIRINGS):
        ax1.bar(np.arange(len(labels)) + (i - 1.5) * width, [table[(lb, pairing)] for lb in labels], width,
                label=f"pairing {pairing}")
    ax1.set_xticks(range(len(labels)), labels, fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("variance per chain evaluation (G x tr Cov of a group mean)")
    ax1.set_title(f"(a) quadratic reward, T={cfg.T}, {evals} evaluations per bar")
    ax1.legend(fontsize=8)
    for (label, pairing), v in curves.items():
        ax2.plot(ks, v, marker="o", ls="-" if pairing == "none" else "--", label=f"{label}, {pairing}")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("reward frequency k in R = cos(k <a, x>)")
    ax2.set_ylabel("variance per chain evaluation")
    ax2.set_title(f"(b) cosine rewards, {evals_b} evaluations per point")
    ax2.legend(fontsize=7)
    for label, g in gains.items():
        ax3.plot(taus, g, marker="o", label=label)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("parameter-noise scale tau (every step)")
    ax3.set_ylabel("gain: unpaired / paired variance per evaluation")
    ax3.set_title(f"(c) the gain of pairing against tau, {evals_b} evaluations per point")
    ax3.legend(fontsize=8)
    save_fig(fig, out, "e7_pairing")
    return {"var_per_eval": table, "gain": {k: table[(k[0], "none")] / v for k, v in table.items()},
            "gain_by_tau": dict(zip(taus, zip(*gains.values())))}


if __name__ == "__main__":
    from .common import cli, setup

    args = cli(__doc__.splitlines()[0])
    setup()
    print(run(args.out, args.quick)["gain"])
