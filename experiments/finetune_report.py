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
        sampler = methods[name].sampler
        plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(0))
        row = {k: _ci([r["curve"][-1][k] for r in runs]) for k in ("reward", "heldout", "diversity", "off_data",
                                                                 "circle_fraction")}
        row["steps"] = sum(r["steps"] for r in runs) / len(runs)
        row["activation_mb"] = max(r["activation_bytes"] for r in runs) / 2 ** 20
        row["time_per_step"] = sum(r["time_per_step"] for r in runs) / len(runs)
        row["cost"] = plan.cost()
        row["grad_var"] = gvar[name]
        row["lr"] = runs[0]["lr"]
        row["pairing"] = methods[name].pairing
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
             "| Method | Pairing | lr | Reward | Held-out reward | Circle fraction | Diversity | Off-data "
             "| Activation memory (MB) | Time per step (s) | Steps | Plan cost fwd/bwd/graph | Grad var FO / HO / ZO |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        c, gv = row["cost"], row["grad_var"]
        f = (lambda k: f"{row[k][0]:.3f} ± {row[k][1]:.3f}")
        lines.append(f"| {name} | {row['pairing']} | {row['lr']:g} | {f('reward')} | {f('heldout')} | {f('circle_fraction')} | {f('diversity')} | {f('off_data')} | "
                     f"{row['activation_mb']:.2f} | {row['time_per_step']:.3f} | {row['steps']:.0f} | "
                     f"{c['forward']}/{c['backward']}/{c['graph_steps']} | "
                     f"{gv['FO']:.3g} / {gv['HO']:.3g} / {gv['ZO']:.3g} |")
    lines += ["", "Plan cost is `Plan.cost()` of one draw (AlignProp and RLR draw K or j per step). "
              "lr: the learning rate chosen by the sweep (below). "
              "Gradient variance: per chain evaluation at the start, per role: G x the trace of the covariance of a "
              f"group mean of G samples (G = 1 unpaired, 2 paired, 4 for `paired4`), from {cfg.n_var} samples. "
              "Time per step: wall time on a shared 2-core machine, two runs at once; compare within a table only. "
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


def auc(run: dict, key: str = "reward") -> float:
    """Mean of ``key`` over the budget (trapezoid rule over the evaluation points)."""
    c = run["curve"]
    area = sum((q["compute"] - p["compute"]) * (p[key] + q[key]) / 2 for p, q in zip(c, c[1:]))
    return area / c[-1]["compute"]


def claims(runs: list, methods_run, reference: dict, gvar: dict) -> list[str]:
    """Markdown lines with the numbers behind the claims (mean ± 95% interval over seeds)."""
    by = {m: [r for r in runs if r["method"] == m] for m in methods_run}
    fin = {m: [r["curve"][-1]["reward"] for r in rs] for m, rs in by.items()}
    area = {m: [auc(r) for r in rs] for m, rs in by.items()}
    f = (lambda v: "{:.3f} ± {:.3f}".format(*_ci(v)))
    g = (lambda d: "{:+.3f} ± {:.3f}".format(*d))
    lines = ["| Method | final reward | mean reward over the budget (sample efficiency) | final held-out | "
             "final diversity / data | final off-data / data | reward at half budget | seconds per run |",
             "|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        half = [min(r["curve"], key=lambda p: abs(p["compute"] - r["curve"][-1]["compute"] / 2))["reward"] for r in rs]
        lines.append(f"| {m} | {f(fin[m])} | {f(area[m])} | {f([r['curve'][-1]['heldout'] for r in rs])} | "
                     f"{f([r['curve'][-1]['diversity'] / reference['data_diversity'] for r in rs])} | "
                     f"{f([r['curve'][-1]['off_data'] / reference['data_off_data'] for r in rs])} | {f(half)} | "
                     f"{f([r['seconds'] for r in rs])} |")
    lines.append("")
    start = by[methods_run[0]][0]["curve"][0]["reward"]
    for m in [m for m in methods_run if m.endswith(("_paired", "_paired4"))]:
        lines.append(f"- {m}: final reward − start ({start:.3f}) {g(_welch(fin[m], [start] * 2))}; "
                     + (f"− full backprop {g(_welch(fin[m], fin['full']))}; final / full = "
                        f"{_ci(fin[m])[0] / _ci(fin['full'])[0]:.3f}" if "full" in by else ""))
    for a, b in (("rlr_h2_paired", "reinforce"), ("rlr_h2_paired", "reinforce_paired"),
                 ("rlr_h0_paired", "reinforce_paired"), ("rlr_h2_paired", "zeroth_order_paired"),
                 ("rlr_h2_paired4", "rlr_h2_paired"), ("rlr_h2_paired", "full")):
        if a in by and b in by:
            lines.append(f"- {a} − {b}: final reward {g(_welch(fin[a], fin[b]))}, "
                         f"mean reward over the budget {g(_welch(area[a], area[b]))} (Welch 95%).")
    for base in ("zeroth_order", "rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3"):
        if base in gvar and f"{base}_paired" in gvar and gvar[f"{base}_paired"]["ZO"] > 0:
            lines.append(f"- ZO variance per evaluation at the start, {base} unpaired / paired: "
                         f"{gvar[base]['ZO'] / gvar[f'{base}_paired']['ZO']:.3g}x "
                         f"({gvar[base]['ZO']:.3g} / {gvar[f'{base}_paired']['ZO']:.3g}).")
    return lines


def sweep_table(sweep: list, chosen: dict, lrs) -> list[str]:
    """The learning-rate sweep: mean reward over the budget per method and rate."""
    lines = ["## Learning-rate sweep", "",
             "One run per method and rate on the sweep seed; the rate with the highest mean reward over the budget "
             "is used for every seed above.", "",
             "| Method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for m in chosen:
        vals = [next(auc(r) for r in sweep if r["method"] == m and r["lr"] == lr) for lr in lrs]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {chosen[m]:g} |")
    return lines


def plot(results: list, setup, out: str, base_samples: torch.Tensor) -> None:
    """Reward vs compute, diversity vs reward, and the final sample grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = setup.cfg
    colours = plt.cm.tab20.colors
    style = (lambda name: "--" if "_paired" in name else ":" if name.endswith("noZO") else "-")  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for i, name in enumerate(cfg.methods):
        runs = [r for r in results if r["method"] == name]
        for ax, (x, key) in zip(axes, (("compute", "reward"), ("compute", "heldout"), ("seconds", "reward"))):
            xs = torch.tensor([[p[x] for p in r["curve"]] for r in runs], dtype=torch.float64).mean(0)
            ys = torch.tensor([[p[key] for p in r["curve"]] for r in runs], dtype=torch.float64)
            ax.plot(xs, ys.mean(0), color=colours[i % 20], ls=style(name), label=name, marker="o", ms=3)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=colours[i % 20], alpha=0.08)
    titles = ("trained reward (classifier A) vs compute", "held-out reward (classifier B) vs compute",
              "trained reward vs wall time")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("seconds (one run at a time per core, shared machine)" if "wall" in title
                      else "UNet evaluations (per sample, forward + backward)")
        ax.set_ylabel("P(circle)")
        ax.set_title(title)
        ax.axhline(setup.reference["data_heldout" if "B" in title else "data_reward"], color="k", ls=":", lw=1)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Reward vs compute and time: mean over seeds, band = min..max; dashed = paired")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "finetune_reward_vs_compute.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"diversity": "diversity (per-pixel variance over samples)",
              "off_data": "off-data (base model's denoising loss)"}
    for ax, key in zip(axes, labels):
        for i, name in enumerate(cfg.methods):
            runs = [r for r in results if r["method"] == name]
            rw = torch.tensor([[p["reward"] for p in r["curve"]] for r in runs]).mean(0)
            dv = torch.tensor([[p[key] for p in r["curve"]] for r in runs]).mean(0)
            ax.plot(rw, dv, color=colours[i % 20], lw=1, alpha=0.6)
            ax.scatter([r["curve"][-1]["reward"] for r in runs], [r["curve"][-1][key] for r in runs],
                       color=colours[i % 20], label=name, s=18)
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
