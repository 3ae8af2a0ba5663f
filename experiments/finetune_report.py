"""Tables, claims and figures of the CPU fine-tuning experiment (:mod:`experiments.finetune_cpu`)."""
from __future__ import annotations

import math
import os

import torch

from halforder.training.files import write_text

def _ci(values) -> tuple[float, float]:
    """Mean and half-width of a 95% Student-t interval (0 for one value)."""
    from scipy import stats

    v = torch.tensor(values, dtype=torch.float64)
    n = len(values)
    if n < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, n - 1) * v.std() / math.sqrt(n))


def summarise(results: list, setup, gvar: dict, methods: dict) -> dict:
    """Per method: final metrics (mean, CI) over seeds, memory, time per step, cost."""
    cfg = setup.cfg
    table = {}
    for name in cfg.methods:
        runs = [r for r in results if r["method"] == name]
        sampler, _ = methods[name]
        plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(0))
        row = {k: _ci([r["curve"][-1][k] for r in runs]) for k in ("reward", "heldout", "diversity", "off_data",
                                                                 "circle_fraction")}
        row["steps"] = sum(r["steps"] for r in runs) / len(runs)
        row["activation_mb"] = max(r["activation_bytes"] for r in runs) / 2 ** 20
        row["time_per_step"] = sum(r["time_per_step"] for r in runs) / len(runs)
        row["cost"] = plan.cost()
        row["grad_var"] = gvar[name]
        table[name] = row
    return table


def write_table(table: dict, setup, path: str, extra: list[str] = ()) -> None:
    """Markdown in the shape of the paper's Table 9, with the extra columns measured here."""
    cfg = setup.cfg
    ref = setup.reference
    lines = [f"Fine-tuning at equal compute ({cfg.budget} UNet evaluations, one per sample per forward or backward pass), "
             f"T={cfg.T}, eta={cfg.eta}, batch {cfg.batch}, seeds {list(cfg.seeds)}; mean ± 95% t-interval over seeds.",
             "",
             f"Pretraining data: reward {ref['data_reward']:.3f}, held-out {ref['data_heldout']:.3f}, "
             f"diversity {ref['data_diversity']:.3f}, off-data {ref['data_off_data']:.3f}, "
             f"circles {ref['data_circle_fraction']:.3f}.",
             "",
             "| Method | Reward | Held-out reward | Circle fraction | Diversity | Off-data | Activation memory (MB) "
             "| Time per step (s) | Steps | Plan cost fwd/bwd/graph | Grad var FO / HO / ZO |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        c, gv = row["cost"], row["grad_var"]
        f = (lambda k: f"{row[k][0]:.3f} ± {row[k][1]:.3f}")
        lines.append(f"| {name} | {f('reward')} | {f('heldout')} | {f('circle_fraction')} | {f('diversity')} | {f('off_data')} | "
                     f"{row['activation_mb']:.2f} | {row['time_per_step']:.3f} | {row['steps']:.0f} | "
                     f"{c['forward']}/{c['backward']}/{c['graph_steps']} | "
                     f"{gv['FO']:.3g} / {gv['HO']:.3g} / {gv['ZO']:.3g} |")
    lines += ["", "Plan cost is `Plan.cost()` of one draw (AlignProp and RLR draw K or j per step). "
              "Gradient variance: trace of the covariance of a one-sample estimate at the start, per role. "
              "Activation memory: peak bytes saved for backward (checkpointed calls excluded, see notes). "
              "Diversity: per-pixel variance over the evaluation samples. Off-data: the base model's denoising "
              "loss on the samples (lower = closer to the pretraining data)."]
    write_text(path, "\n".join([*lines, *extra]) + "\n")


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


def _auc(run: dict, key: str = "reward") -> float:
    """Mean of ``key`` over the budget (trapezoid rule over the evaluation points)."""
    c = run["curve"]
    area = sum((q["compute"] - p["compute"]) * (p[key] + q[key]) / 2 for p, q in zip(c, c[1:]))
    return area / c[-1]["compute"]


def claims(runs: list, methods_run, reference: dict) -> list[str]:
    """Markdown lines with the numbers behind the paper's claims (mean ± 95% interval over seeds)."""
    by = {m: [r for r in runs if r["method"] == m] for m in methods_run}
    fin = {m: [r["curve"][-1]["reward"] for r in rs] for m, rs in by.items()}
    auc = {m: [_auc(r) for r in rs] for m, rs in by.items()}
    f = (lambda v: "{:.3f} ± {:.3f}".format(*_ci(v)))
    g = (lambda d: "{:+.3f} ± {:.3f}".format(*d))
    lines = ["| Method | final reward | mean reward over the budget (sample efficiency) | final held-out | "
             "final diversity / data | final off-data / data | reward at half budget |",
             "|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        half = [min(r["curve"], key=lambda p: abs(p["compute"] - r["curve"][-1]["compute"] / 2))["reward"] for r in rs]
        lines.append(f"| {m} | {f(fin[m])} | {f(auc[m])} | {f([r['curve'][-1]['heldout'] for r in rs])} | "
                     f"{f([r['curve'][-1]['diversity'] / reference['data_diversity'] for r in rs])} | "
                     f"{f([r['curve'][-1]['off_data'] / reference['data_off_data'] for r in rs])} | {f(half)} |")
    lines.append("")
    for m in [m for m in methods_run if m.startswith("rlr")]:
        if "reinforce" in by:
            lines.append(f"- {m} − reinforce: final reward {g(_welch(fin[m], fin['reinforce']))}, "
                         f"mean reward over the budget {g(_welch(auc[m], auc['reinforce']))} (Welch 95%).")
    hs = [m for m in ("rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3") if m in by]
    for a, b in zip(hs, hs[1:]):
        lines.append(f"- {b} − {a}: final reward {g(_welch(fin[b], fin[a]))}, "
                     f"mean reward over the budget {g(_welch(auc[b], auc[a]))}.")
    return lines


def plot(results: list, setup, out: str, base_samples: torch.Tensor) -> None:
    """Reward vs compute, diversity vs reward, and the final sample grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = setup.cfg
    colours = plt.cm.tab10.colors
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(cfg.methods):
        runs = [r for r in results if r["method"] == name]
        for ax, key in zip(axes, ("reward", "heldout")):
            xs = torch.tensor([[p["compute"] for p in r["curve"]] for r in runs], dtype=torch.float64).mean(0)
            ys = torch.tensor([[p[key] for p in r["curve"]] for r in runs], dtype=torch.float64)
            m = ys.mean(0)
            ax.plot(xs, m, color=colours[i % 10], label=name, marker="o", ms=3)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=colours[i % 10], alpha=0.12)
    for ax, title in zip(axes, ("trained reward (classifier A)", "held-out reward (classifier B)")):
        ax.set_xlabel("UNet evaluations (per sample, forward + backward)")
        ax.set_ylabel("P(circle)")
        ax.set_title(title)
        ax.axhline(setup.reference["data_reward" if "A" in title else "data_heldout"], color="k", ls=":", lw=1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Reward vs compute: mean over seeds, band = min..max")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "finetune_reward_vs_compute.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"diversity": "diversity (per-pixel variance over samples)",
              "off_data": "off-data (base model's denoising loss)"}
    for ax, key in zip(axes, labels):
        for i, name in enumerate(cfg.methods):
            runs = [r for r in results if r["method"] == name]
            rw = torch.tensor([[p["reward"] for p in r["curve"]] for r in runs]).mean(0)
            dv = torch.tensor([[p[key] for p in r["curve"]] for r in runs]).mean(0)
            ax.plot(rw, dv, color=colours[i % 10], lw=1, alpha=0.6)
            ax.scatter([r["curve"][-1]["reward"] for r in runs], [r["curve"][-1][key] for r in runs],
                       color=colours[i % 10], label=name, s=18)
        ax.axhline(setup.reference[f"data_{key}"], color="k", ls=":", lw=1, label="data")
        ax.set_xlabel("reward P(circle)")
        ax.set_ylabel(labels[key])
    axes[0].legend(fontsize=7)
    fig.suptitle("Collapse and drift vs reward (lines: mean path over seeds; dots: final, per seed)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "finetune_diversity_vs_reward.png"), dpi=120)
    plt.close(fig)

    rows = [("base", base_samples[:16])]
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
