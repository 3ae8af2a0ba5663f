"""Tables, claims and figures of the CPU fine-tuning experiment (:mod:`experiments.finetune_cpu`).

The main figure is the area under reward against counted compute, divided by the budget
(the mean reward over the budget, :func:`auc`); the final reward comes second. Intervals
are 95% Student-t over seeds; differences between methods use Welch's interval.
"""
from __future__ import annotations

import math
import os

import torch

from halforder.training.files import write_text

BIASED = {"alignprop": "biased: drops steps", "draft1": "biased: drops steps", "reinforce_grpo": "biased: GRPO advantage",
          "rlr_h2_noZO": "biased: drops the ZO steps"}


def _ci(values) -> tuple[float, float]:
    """Mean and half-width of a 95% Student-t interval (NaN for one value: no interval)."""
    from scipy import stats

    v = torch.tensor(values, dtype=torch.float64)
    n = len(values)
    if n < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, n - 1) * v.std() / math.sqrt(n))


def _welch(a, b) -> tuple[float, float]:
    """Difference of means a - b and the half-width of its 95% Welch interval."""
    from scipy import stats

    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return d, float("nan")
    va, vb = float(a.var()) / len(a), float(b.var()) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return d, float(stats.t.ppf(0.975, df) * se)


def num(v: float, sign: bool = False) -> str:
    """``v`` with three decimals, or three significant digits where it is below 0.01 (three
    decimals would show 0.000); ``n/a`` for NaN."""
    if math.isnan(v):
        return "n/a"
    plus = "+" if sign else ""
    return f"{v:{plus}.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:{plus}.3g}"


def interval(mean_half: tuple[float, float], sign: bool = False) -> str:
    """``mean ± half-width`` (see :func:`num`); the half-width is ``n/a`` where there is none (one seed)."""
    mean, half = mean_half
    return f"{num(mean, sign)} ± {num(half)}"


def auc(run: dict, key: str = "reward") -> float:
    """Area under ``key`` against compute (trapezoids over the evaluation points), divided by
    the compute spent: the mean of ``key`` over the budget."""
    c = run["curve"]
    area = sum((q["compute"] - p["compute"]) * (p[key] + q[key]) / 2 for p, q in zip(c, c[1:]))
    return area / c[-1]["compute"]


def summarise(results: list, setup, gvar: dict, methods: dict, where: dict) -> dict:
    """Per method: AUC and final metrics (mean, CI) over seeds, memory, time, cost, the rate."""
    cfg = setup.cfg
    table = {}
    for name in cfg.methods:
        runs = [r for r in results if r["method"] == name]
        sampler = methods[name].sampler
        plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(0))
        row = {k: _ci([r["curve"][-1][k] for r in runs]) for k in ("reward", "circle", "diversity", "off_data")}
        row["auc"] = _ci([auc(r) for r in runs])
        row["steps"] = sum(r["steps"] for r in runs) / len(runs)
        row["evaluations"] = sum(r["forward"] + r["backward"] for r in runs) / len(runs)
        # metered evaluations per sample of one update: variance x this is the variance at one evaluation's compute
        row["per_sample"] = sum(r["forward"] + r["backward"] for r in runs) / sum(r["steps"] * cfg.batch for r in runs)
        row["activation_mb"] = max(r["activation_bytes"] for r in runs) / 2 ** 20
        row["time_per_step"] = sum(r["time_per_step"] for r in runs) / len(runs)
        row["seconds"] = _ci([r["seconds"] for r in runs])
        row["cost"] = plan.cost()
        row["grad_var"] = gvar[name]
        row["lr"] = runs[0]["lr"]
        row["lr_position"] = where[name]
        row["pairing"] = methods[name].pairing
        row["label"] = BIASED.get(name, "unbiased")
        table[name] = row
    return table


def write_table(table: dict, setup, path: str, extra: list[str], jobs: int) -> None:
    """The results table, then ``extra`` lines."""
    cfg = setup.cfg
    ref = setup.reference
    f = interval
    lines = [f"Fine-tuning at equal counted compute: {cfg.budget} denoiser evaluations per run (per sample, "
             f"forward + backward, checkpoint and HO recomputation included, from the library's compute meter and "
             f"checked against each plan's exact cost), T={cfg.T}, eta={cfg.eta}, batch {cfg.batch}, "
             f"seeds {list(cfg.seeds)}; mean ± 95% t-interval over seeds. Sorted by AUC.",
             "",
             f"Reward: closeness to the target image, exp(-MSE / {cfg.target.scale:g}) (ceiling 1). Pretraining "
             f"data: reward {num(ref['data_reward'])}, P(circle) {num(ref['data_circle'])}, diversity "
             f"{num(ref['data_diversity'])}, off-data {num(ref['data_off_data'])}.",
             "",
             "| Method | Label | Pairing | lr (position) | AUC: mean reward over the budget | Final reward | P(circle) "
             "| Diversity | Off-data | Updates | Seconds per run | Activation memory (MB) | Plan cost fwd/bwd/graph "
             "| Evaluations per sample | Grad var per sample FO / HO / ZO | Grad var x evaluations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["auc"][0]):
        c, gv = row["cost"], row["grad_var"]
        lines.append(f"| {name} | {row['label']} | {row['pairing']} | {row['lr']:g} ({row['lr_position']}) | "
                     f"**{f(row['auc'])}** | {f(row['reward'])} | {f(row['circle'])} | {f(row['diversity'])} | "
                     f"{f(row['off_data'])} | {row['steps']:.0f} | {f(row['seconds'])} | {row['activation_mb']:.2f} | "
                     f"{c['forward']}/{c['backward']}/{c['graph_steps']} | {row['per_sample']:.3g} | "
                     f"{gv['FO']:.3g} / {gv['HO']:.3g} / {gv['ZO']:.3g} | {gv['total'] * row['per_sample']:.3g} |")
    lines += ["", "Plan cost is `Plan.cost()` of one draw (AlignProp and RLR draw K or j per update); full backprop "
              "is checkpointed, so it also pays one recomputation per step. lr: the rate chosen by the sweep (below) "
              "and whether it lies inside the rates tried. Evaluations per sample: denoiser evaluations of one update "
              "per sample, metered. Gradient variance per sample at the start, per role: G x the trace of the "
              "covariance of a group mean of G samples (G = 1 unpaired, 2 paired), from "
              f"{cfg.n_var} samples; times the evaluations per sample, it is the variance of an estimate that "
              "costs one evaluation (lower is better at equal compute). Seconds: training time of one run, "
              f"evaluations excluded, {jobs} run(s) at a time on a 2-core machine, one thread each. Activation "
              "memory: peak bytes saved for backward. "
              "Diversity: per-pixel variance over the evaluation samples. Off-data: the base model's denoising "
              "loss on the samples (lower = closer to the pretraining data). P(circle): a shape classifier's "
              "probability of a circle (the target is one), never optimised."]
    write_text(path, "\n".join([*lines, "", *extra]) + "\n")


def claims(runs: list, methods_run, reference: dict, table: dict) -> list[str]:
    """Markdown lines comparing the methods (Welch 95% intervals over seeds)."""
    by = {m: [r for r in runs if r["method"] == m] for m in methods_run}
    area = {m: [auc(r) for r in rs] for m, rs in by.items()}
    fin = {m: [r["curve"][-1]["reward"] for r in rs] for m, rs in by.items()}
    g = (lambda d: interval(d, sign=True))  # noqa: E731
    lines = ["## Comparisons", ""]
    ref = "full" if "full" in by else methods_run[0]
    start = by[ref][0]["curve"][0]["reward"]
    for m in sorted(by, key=lambda m: -table[m]["auc"][0]):
        if m != ref:
            lines.append(f"- {m} − {ref}: AUC {g(_welch(area[m], area[ref]))}, final {g(_welch(fin[m], fin[ref]))}; "
                         f"final − start ({num(start)}) {g(_welch(fin[m], [start] * 2))}.")
    for base in ("zeroth_order", "rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3"):
        if base in by and f"{base}_paired" in by:
            lines.append(f"- {base}, paired − unpaired: AUC {g(_welch(area[base + '_paired'], area[base]))}; ZO variance "
                         f"per sample at the start (equal cost), unpaired / paired "
                         f"{table[base]['grad_var']['ZO'] / max(table[base + '_paired']['grad_var']['ZO'], 1e-300):.3g}x.")
    return lines


def headroom(runs: list, cfg) -> list[str]:
    """Whether the task had headroom at the budget's end: the best method's final reward
    against the ceiling (1), and the gap to the runner-up at the last two evaluations."""
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    if len(by) < 2:
        return []
    rank = sorted(by, key=lambda m: -sum(auc(r) for r in by[m]) / len(by[m]))
    best, second = rank[0], rank[1]
    at = (lambda m, i: [r["curve"][i]["reward"] for r in by[m]])
    lines = ["## Headroom", "",
             f"- Best by AUC: {best}; final reward {interval(_ci(at(best, -1)))} of a ceiling of 1; "
             f"one evaluation earlier {interval(_ci(at(best, -2)))}."]
    for i, label in ((-2, "one evaluation before the end"), (-1, "at the end")):
        lines.append(f"- {best} − {second} (runner-up by AUC), {label}: "
                     + interval(_welch(at(best, i), at(second, i)), sign=True))
    return lines


def sweep_table(sweep: list, chosen: dict, where: dict) -> list[str]:
    """The learning-rate sweep: AUC per method and rate, on the sweep seed."""
    lrs = sorted({r["lr"] for r in sweep})
    lines = ["## Learning-rate sweep", "",
             "One run per method and rate on the sweep seed; the rate with the highest AUC is used for every seed "
             "above. The grid starts at the configured rates and is extended by factors of 3 past the edge that "
             "holds the best rate; '—': not run; '(skipped)': an update had a non-finite gradient.", "",
             "| Method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen | position |",
             "|---|" + "---|" * (len(lrs) + 2)]
    for m in chosen:
        cells = []
        for lr in lrs:
            r = next((r for r in sweep if r["method"] == m and r["lr"] == lr), None)
            cells.append("—" if r is None else num(auc(r)) + (" (skipped)" if r.get("diverged") else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen[m]:g} | {where[m]} |")
    return lines


def plot(results: list, setup, out: str, base_samples: torch.Tensor, jobs: int) -> None:
    """Reward against counted compute and against training time (mean over seeds, 95% band),
    and the final sample grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = setup.cfg
    colours = plt.cm.tab20.colors
    style = (lambda name: "--" if "_paired" in name else ":" if name in BIASED else "-")  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for i, name in enumerate(cfg.methods):
        runs = [r for r in results if r["method"] == name]
        ys = torch.tensor([[p["reward"] for p in r["curve"]] for r in runs], dtype=torch.float64)
        mean, half = ys.mean(0), torch.tensor([_ci(col.tolist())[1] for col in ys.T])
        for ax, x in zip(axes, ("compute", "seconds")):
            xs = torch.tensor([[p[x] for p in r["curve"]] for r in runs], dtype=torch.float64).mean(0)
            ax.plot(xs, mean, color=colours[i % 20], ls=style(name), label=name, marker="o", ms=3)
            ax.fill_between(xs, mean - half, mean + half, color=colours[i % 20], alpha=0.08)
    axes[0].set_xlabel("denoiser evaluations (per sample, forward + backward; the library's meter)")
    axes[1].set_xlabel(f"training seconds ({jobs} run(s) at a time on 2 cores, evaluations excluded)")
    for ax in axes:
        ax.set_ylabel(f"reward exp(-MSE / {cfg.target.scale:g}) to the target")
        ax.axhline(setup.reference["data_reward"], color="k", ls=":", lw=1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Reward against counted compute and time: mean over {len(cfg.seeds)} seeds, band = 95% interval; "
                 "dashed = paired, dotted = biased")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "finetune_reward_vs_compute.png"), dpi=110)
    plt.close(fig)

    rows = [("target", setup.reward.target.mul(2).sub(1).expand(4, -1, -1, -1)), ("base", base_samples[:16])]
    rows += [(r["method"], torch.tensor(r["final_samples"])) for r in results if r["final_samples"] is not None]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.62 * len(rows) + 0.3))
    for ax, (name, x) in zip(axes, rows):
        img = torch.cat([torch.nn.functional.pad((x[i] + 1) / 2, (1, 1, 1, 1), value=1.0) for i in range(len(x))], 2)
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Samples at the end (seed {cfg.seeds[0]}, fixed evaluation noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "finetune_samples.png"), dpi=120)
    plt.close(fig)
