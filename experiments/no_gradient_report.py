"""Tables, comparisons and figures of :mod:`experiments.no_gradient`.

Per reward and method, over seeds (95% Student-t intervals; differences by Welch's interval):
the area under the trained reward against counted compute divided by the budget (AUC, the
mean reward over the budget), the same against wall time up to a common horizon, the final
trained reward on the training and the held-out prompts, the reward not trained on, the
second classifier's prompt-following, and the diversity of the samples.
"""
from __future__ import annotations

import os

import torch

from experiments.finetune_report import _ci, _welch, auc, interval, num, sweep_table
from experiments.no_gradient_world import grid
from halforder.training.files import write_text

UNBIASED_STEPS = {"reinforce_loo", "dance_weighted", "mix_weighted", "fast_weighted", "zo", "zo_paired", "rlr_no_fo",
                  "rlr_no_fo_paired"}
OTHER = {"prompt": "jpeg", "jpeg": "prompt"}


def time_auc(run: dict, horizon: float) -> float:
    """The mean trained reward over training seconds 0..``horizon`` (the curve linearly
    interpolated between its evaluations, held at its last value past its end)."""
    xs = [p["seconds"] for p in run["curve"]]
    ys = [p["reward"] for p in run["curve"]]
    grid = torch.linspace(0, horizon, 201, dtype=torch.float64)
    vals = torch.tensor([_interp(x, xs, ys) for x in grid.tolist()], dtype=torch.float64)
    return float(torch.trapezoid(vals, grid) / horizon)


def _interp(x: float, xs: list, ys: list) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def summarise(runs: list, reward: str) -> dict:
    """Per method run on ``reward``: each figure's mean and half-width over seeds."""
    mine = [r for r in runs if r["reward_name"] == reward]
    horizon = min(r["seconds"] for r in mine)
    table = {}
    for m in dict.fromkeys(r["method"] for r in mine):
        rs = [r for r in mine if r["method"] == m]
        last = (lambda key: _ci([r["curve"][-1][key] for r in rs]))  # noqa: E731
        table[m] = {"auc": _ci([auc(r) for r in rs]), "time_auc": _ci([time_auc(r, horizon) for r in rs]),
                    "final": last(f"{reward}/train"), "held_out": last(f"{reward}/held_out"),
                    "other": last(f"{OTHER[reward]}/train"), "check": last("prompt_check/train"),
                    "check_held_out": last("prompt_check/held_out"), "diversity": last("diversity/train"),
                    "updates": sum(r["updates"] for r in rs) / len(rs), "seconds": sum(r["seconds"] for r in rs) / len(rs),
                    "evaluations": sum(r["forward"] + r["backward"] for r in rs) / len(rs), "lr": rs[0]["lr"],
                    "seeds": len(rs), "ratio": _ci([r["curve"][-1].get("ratio_mean") or 1.0 for r in rs])}
    return {"horizon": horizon, "methods": table}


def comparisons(runs: list, reward: str, table: dict) -> list[str]:
    """The verdict lines: differences of AUC (compute and time) and final reward, by Welch."""
    mine = [r for r in runs if r["reward_name"] == reward]
    by = {m: [r for r in mine if r["method"] == m] for m in table["methods"]}
    area = {m: [auc(r) for r in rs] for m, rs in by.items()}
    tarea = {m: [time_auc(r, table["horizon"]) for r in rs] for m, rs in by.items()}
    g = (lambda d: interval(d, sign=True))  # noqa: E731
    ranked = sorted(by, key=lambda m: -table["methods"][m]["auc"][0])
    lines = [f"- Best AUC per evaluation: {ranked[0]} ({interval(table['methods'][ranked[0]]['auc'])}); best per "
             f"second: {max(by, key=lambda m: table['methods'][m]['time_auc'][0])}."]
    ref = max((m for m in by if m.startswith("flow_grpo")), key=lambda m: table["methods"][m]["auc"][0],
              default=ranked[0])   # the best Flow-GRPO, against which every method is compared
    for m in ranked:
        if m != ref:
            lines.append(f"- {m} − {ref}: AUC {g(_welch(area[m], area[ref]))}, AUC per second "
                         f"{g(_welch(tarea[m], tarea[ref]))}.")
    for field in ("dance", "mix", "fast"):
        if field in by and f"{field}_weighted" in by:
            lines.append(f"- {field}: weighted − field's: AUC {g(_welch(area[field + '_weighted'], area[field]))}.")
    for base in ("zo", "rlr_no_fo"):
        if base in by and f"{base}_paired" in by:
            lines.append(f"- {base}: paired − unpaired: AUC {g(_welch(area[base + '_paired'], area[base]))}.")
    return lines


def write_all(world, runs: list, sweeps: list, chosen: dict, where: dict, out: str, jobs: int) -> dict:
    """``no_gradient_table.md`` and the figures in ``out``; returns the summaries by reward."""
    cfg = world.cfg
    start, _ = world.start
    tables = {reward: summarise(runs, reward) for reward in dict.fromkeys(r["reward_name"] for r in runs)}
    lines = ["# Learning from a reward with no gradient, at equal counted compute", "",
             "Written by `python experiments/no_gradient.py` (configuration and seeds in no_gradient_results.json). "
             f"Budget per run: {cfg.budget:,} denoiser evaluations on `prompt`, {cfg.jpeg_budget:,} on `jpeg` (the "
             f"library's meter, forward + backward, per sample), {len(cfg.seeds)} seeds, batch {cfg.batch} in prompt groups of {world.group}, T = {cfg.T}, "
             f"{jobs} run(s) at a time on 2 cores. Mean ± 95% interval over seeds.", "",
             f"Start (the base model): prompt-following {num(start['prompt/train'])} on the training prompts, "
             f"{num(start['prompt/held_out'])} held out; JPEG reward {num(start['jpeg/train'])} kB; "
             f"diversity {num(start['diversity/train'])}. On the data: prompt-following "
             f"{num(world.reference['data_prompt'])}, JPEG {num(world.reference['data_jpeg'])}.", "",
             "## The group size `halforder diagnose` advised", "", *advice_lines(world.advice), ""]
    for reward, t in tables.items():
        lines += [f"## Trained on `{reward}`", "",
                  f"AUC per second: the mean reward over the first {t['horizon']:.0f} training seconds (the shortest "
                  "run's; evaluations excluded). 'held out': prompts never trained on. "
                  f"'{OTHER[reward]}': the other reward, not trained on. 'check': the second classifier's "
                  "prompt-following. 's': training seconds per run.", "",
                  "| method | steps | AUC | AUC per second | final | held out | "
                  f"{OTHER[reward]} | check | diversity | updates | s | lr |", "|---|" + "---|" * 11]
        for m, row in sorted(t["methods"].items(), key=lambda kv: -kv[1]["auc"][0]):
            lines.append(f"| {m} | {'unbiased' if m in UNBIASED_STEPS else 'field'} | {interval(row['auc'])} | "
                         f"{interval(row['time_auc'])} | {interval(row['final'])} | {interval(row['held_out'])} | "
                         f"{interval(row['other'])} | {interval(row['check'])} | {num(row['diversity'][0])} | "
                         f"{row['updates']:.0f} | {row['seconds']:.0f} | {row['lr']:g} |")
        lines += ["", "### Comparisons", "", *comparisons(runs, reward, t), ""]
        mine = [r for r in sweeps if r["reward_name"] == reward]
        if mine:
            lines += [*sweep_table(mine, chosen[reward], where[reward]), ""]
    write_text(os.path.join(out, "no_gradient_table.md"), "\n".join(lines) + "\n")
    plot(world, runs, tables, out, jobs)
    return tables


def advice_lines(advice: dict) -> list[str]:
    """What the diagnosis measured and which group it chose."""
    if "given" in advice:
        return [f"Not asked: the group size was given ({advice['given']})."]
    lines = [f"A pilot of {advice['pilot']['rows']} samples ({advice['pilot']['groups']} groups of "
             f"{advice['pilot']['group']}) on the Flow-GRPO recipe at the start, {advice['spent']:,} evaluations. "
             f"Smallest batch for cos >= {advice['target']} with the true gradient:", ""]
    for name, v in advice["curves"].items():
        lines.append(f"- {name}: " + (f"B = {v['batch']} ({v['evaluations']:,.0f} evaluations per update)"
                                      if v["batch"] else f"never (limit {num(v['limit'])})"))
    shares = advice["step_shares"]
    lines += ["", "Each step's share of the signal (the likelihood-ratio term with the recipe's advantage, every "
              "step; t = 1 makes x_0): " + ", ".join(f"t = {t}: {v:.0%}" for t, v in enumerate(shares, start=1))
              + f". 90% of it: steps {advice['suggest']['steps']}, shortest window {advice['suggest']['window']}."]
    c = advice.get("chosen")
    lines += ["", f"Chosen: groups of {c['group']} (the cheapest that reaches it)." if c else
              "No group reached it; groups of 4 were used."]
    return lines


def plot(world, runs: list, tables: dict, out: str, jobs: int) -> None:
    """Reward against counted compute and against wall time per reward, and final samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.cm.tab20.colors
    fig, axes = plt.subplots(len(tables), 2, figsize=(15, 5 * len(tables)), squeeze=False)
    for row, (reward, t) in zip(axes, tables.items()):
        for i, m in enumerate(t["methods"]):
            rs = [r for r in runs if r["reward_name"] == reward and r["method"] == m]
            ys = torch.tensor([[p["reward"] for p in r["curve"]] for r in rs], dtype=torch.float64)
            mean = ys.mean(0)
            half = torch.tensor([_ci(c.tolist())[1] for c in ys.T]).nan_to_num(0.0)
            style = "-" if m in UNBIASED_STEPS else ":"
            for ax, x in zip(row, ("compute", "seconds")):
                xs = torch.tensor([[p[x] for p in r["curve"]] for r in rs], dtype=torch.float64).mean(0)
                ax.plot(xs, mean, color=colours[i % 20], ls=style, marker="o", ms=3, label=m)
                ax.fill_between(xs, mean - half, mean + half, color=colours[i % 20], alpha=0.08)
        row[0].set_xlabel("denoiser evaluations per run (the library's meter)")
        row[1].set_xlabel(f"training seconds ({jobs} run(s) at a time on 2 cores, evaluations excluded)")
        for ax in row:
            ax.set_ylabel(f"{reward} reward, training prompts")
        row[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Rewards with no gradient: mean over seeds, band = 95% interval; dotted = the field's biased step sets")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(os.path.join(out, "no_gradient_reward_vs_compute.png"), dpi=100)
    plt.close(fig)

    rows = [("base", grid(world, world.start[1]))] + [(f"{r['reward_name']}: {r['method']}", torch.tensor(r["final_samples"]))
                               for r in runs if r["final_samples"] is not None]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 0.55 * len(rows) + 0.4), squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], rows):
        img = torch.cat([torch.nn.functional.pad((x[i] + 1) / 2, (1, 1, 1, 1), value=1.0) for i in range(len(x))], 2)
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    per = min(4, world.cfg.n_eval)
    fig.suptitle(f"Final samples (first seed, fixed noise), {per} per prompt:\n{', '.join(world.train_prompts)}, "
                 f"then held out: {', '.join(world.cfg.held_out)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "no_gradient_samples.png"), dpi=110)
    plt.close(fig)

