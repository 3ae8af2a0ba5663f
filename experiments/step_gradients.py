"""Why the ZO part does or does not learn, measured: per-step pathwise gradients on the model
of the CPU fine-tuning experiment (:mod:`experiments.finetune_cpu`).

g_t is the pathwise gradient of R(x_0) through the parameters of step t alone, per sample:
truncated(t) - truncated(t-1) on the same noise, all of them from one rollout of full
backprop with a parameter leaf per step (:func:`~halforder.estimators.theory.step_gradients`). Reported by step t:
|E g_t|, the per-sample spread E|g_t|^2 and cos(E g_t, E g_1).

The floor of paired ZO (:func:`~halforder.estimators.theory.paired_zo_floor`): to first order
in tau its variance per pair is m d sum_t E|g_t|^2 + 2 E|G|^2 - |E G|^2 with m ZO steps,
d parameters and G = sum_t g_t, m times the floor d sum_t E|g_t|^2 of one perturbation
shared by all steps, because each step draws its own parameter noise. The experiment
measures paired ZO's variance on the same model and sets it beside both.

    python experiments/step_gradients.py                  # docs/results/step_gradients.{md,png,json}
    python experiments/step_gradients.py --reward circle  # the classifier reward instead of the target image
    python experiments/step_gradients.py --quick          # smoke run into runs/step-gradients-quick/
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import require_extras  # noqa: E402

if __name__ == "__main__":   # at once, before the imports below need them
    require_extras("plots", "diffusion")

from experiments.finetune_cpu import QUICK, ExperimentConfig  # noqa: E402
from experiments.shapes.world import UNCONDITIONAL, build_setup  # noqa: E402
from halforder.estimators import ComputeMeter, Plan, draw_estimates, expected_evaluations  # noqa: E402
from halforder.estimators.theory import paired_zo_floor, pathwise_step_gradients  # noqa: E402
from halforder.training.files import write_json, write_text  # noqa: E402


def step_gradients(setup, n: int, seed: int = 0) -> torch.Tensor:
    """Per-sample g_t for t = 1..T, ``[T, n, d]`` (:func:`~halforder.estimators.theory.pathwise_step_gradients`),
    its compute checked against full backprop's exact cost."""
    T = setup.cfg.T
    task = setup.task()
    with ComputeMeter() as meter:
        g = pathwise_step_gradients(lambda plan: task.chain(plan, UNCONDITIONAL * n), task.params, T, n, seed=seed)
    want = sum(expected_evaluations(Plan.full(T), n).values())
    if meter.total != want:
        raise RuntimeError(f"metered {meter.total} evaluations, full backprop costs {want}")
    return g


def paired_zo(setup, n_pairs: int, seed: int = 1) -> torch.Tensor:
    """Per-pair estimates ``[n_pairs, d]`` of paired ZO (every step ZO, mirrored parameter noise)."""
    task = setup.task()
    plan = Plan.zeroth_order(setup.cfg.T)
    chain = task.chain(plan, UNCONDITIONAL * 2 * n_pairs)
    return draw_estimates(chain, plan, task.params, n_pairs, generator=torch.Generator().manual_seed(seed),
                          pairing="param").grad.double()


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def measure(setup, n: int, n_pairs: int) -> dict:
    """Everything the report shows (module docstring)."""
    g = step_gradients(setup, n)
    T, _, d = g.shape
    mean = g.mean(1)                                      # E g_t, [T, d]
    sq = g.pow(2).sum(2)                                  # |g_t|^2 per sample, [T, n]
    total = g.sum(0)                                      # G per sample
    rows = []
    for t in range(T):
        spread = (g[t] - mean[t]).pow(2).sum(1)
        rows.append({"t": t + 1, "mean_norm": float(mean[t].norm()), "mean_sq": float(mean[t].pow(2).sum()),
                     "sq": _mean_se(sq[t]), "spread_over_mean": float(spread.mean().sqrt() / mean[t].norm()),
                     "cos_g1": float(torch.nn.functional.cosine_similarity(mean[t], mean[0], 0))})
    sum_sq = sq.sum(0)                                    # sum_t |g_t|^2 per sample
    floor_se = float((T * d * sum_sq + 2 * total.pow(2).sum(1)).std()) / math.sqrt(n)
    zo = paired_zo(setup, n_pairs)
    dev = (zo - zo.mean(0)).pow(2).sum(1) * n_pairs / (n_pairs - 1)
    return {"T": T, "d": d, "n": n, "n_pairs": n_pairs, "steps": rows,
            "mean_total_sq": float(total.mean(0).pow(2).sum()), "floor": (paired_zo_floor(g), floor_se),
            "floor_shared": (d * _mean_se(sum_sq)[0], d * _mean_se(sum_sq)[1]),
            "zo_variance": _mean_se(dev), "tau": setup.cfg.zo_sigma}


def write(result: dict, out: str, label: str) -> None:
    """Markdown table and figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = (lambda v: f"{v[0]:.3g} ± {1.96 * v[1]:.2g}")
    lines = [f"# Per-step pathwise gradients ({label})", "",
             f"LoRA, d = {result['d']} parameters, T = {result['T']}, {result['n']} samples for g_t, "
             f"{result['n_pairs']} antithetic pairs for paired ZO (tau = {result['tau']:g} on every step); ± is a 95% "
             f"normal interval.", "",
             "| step t | abs(E g_t) | E abs(g_t)^2 | spread / abs(E g_t) | cos(E g_t, E g_1) |", "|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['t']} | {r['mean_norm']:.3g} | {f(r['sq'])} | {r['spread_over_mean']:.3g} | "
                     f"{r['cos_g1']:.3f} |")
    share = [r["mean_sq"] for r in result["steps"]]
    lines += ["", f"abs(E G)^2 = {result['mean_total_sq']:.3g} for the whole gradient G = sum_t g_t; "
              f"abs(E g_1)^2 = {share[0]:.3g}.", "",
              "| paired ZO, variance per pair (trace of the covariance) | value |", "|---|---|",
              f"| measured | {f(result['zo_variance'])} |",
              f"| floor, first order in tau: T d sum_t E abs(g_t)^2 + 2 E abs(G)^2 - abs(E G)^2 | {f(result['floor'])} |",
              f"| d sum_t E abs(g_t)^2 (one shared perturbation for all steps) | {f(result['floor_shared'])} |",
              f"| measured / floor | {result['zo_variance'][0] / result['floor'][0]:.3g} |",
              f"| signal abs(E G)^2 / (measured variance per pair) | "
              f"{result['mean_total_sq'] / result['zo_variance'][0]:.3g} |"]
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "step_gradients" + ("" if label == "target" else f"_{label}"))
    write_text(stem + ".md", "\n".join(lines) + "\n")
    write_json(stem + ".json", result)
    t = [r["t"] for r in result["steps"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].semilogy(t, [r["mean_norm"] for r in result["steps"]], "o-", label="abs(E g_t)")
    axes[0].semilogy(t, [math.sqrt(r["sq"][0]) for r in result["steps"]], "s--", label="sqrt(E abs(g_t)^2)")
    axes[0].set_xlabel("step t (1 = last, produces x_0)")
    axes[0].legend()
    axes[0].set_title("mean and per-sample size of g_t")
    axes[1].plot(t, [r["cos_g1"] for r in result["steps"]], "o-")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_xlabel("step t")
    axes[1].set_title("cos(E g_t, E g_1)")
    names = ["measured", "floor (T d sum)", "d sum (shared)", "signal abs(E G)^2"]
    vals = [result["zo_variance"][0], result["floor"][0], result["floor_shared"][0], result["mean_total_sq"]]
    axes[2].bar(names, vals, color=["C0", "C1", "C2", "C3"])
    axes[2].set_yscale("log")
    axes[2].set_title("paired ZO: variance per pair against its floor")
    axes[2].tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Per-step pathwise gradients on the CPU fine-tuning model ({label} reward)")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and samples: a smoke test (writes to runs/)")
    p.add_argument("--reward", choices=("target", "circle"), default="target",
                   help="the experiment's target-image reward, or the classifier's P(circle)")
    p.add_argument("--n", type=int, default=32, help="samples for the per-step gradients")
    p.add_argument("--pairs", type=int, default=128, help="antithetic pairs for paired ZO's variance")
    p.add_argument("--out", help="default: docs/results (with --quick, runs/step-gradients-quick)")
    p.add_argument("--cache", help="weights cache (default: experiments/cache; with --quick, runs/cache)")
    args = p.parse_args(argv)
    if args.n < 2 or args.pairs < 2:
        p.error("--n and --pairs must be at least 2")
    cfg = QUICK if args.quick else ExperimentConfig()
    n, pairs = (4, 4) if args.quick else (args.n, args.pairs)
    out = args.out or (os.path.join("runs", "step-gradients-quick") if args.quick else os.path.join("docs", "results"))
    cache = args.cache or (os.path.join("runs", "cache") if args.quick else os.path.join("experiments", "cache"))
    torch.set_num_threads(1)
    setup = build_setup(cfg, cache)
    if args.reward == "circle":
        setup = dataclasses.replace(setup, reward=setup.circle)
    result = measure(setup, n, pairs)
    write(result, out, args.reward)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
