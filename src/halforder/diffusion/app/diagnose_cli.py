"""``halforder diagnose``: on a run's own model, reward and estimator, which steps carry the
gradient, how large the batch and the group must be, and whether the likelihood ratios are
consistent (:mod:`halforder.planning.diagnose`; docs/why-my-reward-does-not-rise.md).

    halforder diagnose --preset tiny-sd3 --estimator reinforce --group-size 4 --budget 20000
    halforder diagnose --config run.yaml --out diag

It takes every setting of ``halforder train``, measures within a budget of counted
evaluations (by default 2% of the run's), prints a summary and writes ``diagnosis.md``
(with plots, where matplotlib is installed) and ``diagnosis.json`` to ``--out``. Bad input
ends with one line and exit status 2, before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from ...estimators.compute import expected_evaluations
from ...planning.diagnose import Diagnosis, diagnose, finite, kind_of
from ...training.files import atomic_dir, write_text

UNRESOLVED = ("the pilot does not resolve the gradient: |E g|^2 is not told apart from the noise at this size "
              "(a larger --budget draws more samples)")
BATCHES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RUN_SHARE = 0.02


def run_evaluations(cfg, sampler) -> int:
    """The evaluations a run of ``cfg`` counts: steps x accumulation x one estimate of
    ``batch_size`` samples of the sampler's plan (its first draw; an update rule's reuse adds its
    recomputations, which this leaves out)."""
    import torch
    plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(cfg.seed))
    e = expected_evaluations(plan, cfg.batch_size)
    return cfg.steps * cfg.grad_accum * (e["forward"] + e["backward"])


def summary(d: Diagnosis) -> str:
    """The terminal summary: which steps carry the signal, the batch each estimator needs, the
    ratio check, and what the diagnosis spent."""
    lines = [f"per-step {d.kind} terms from {d.pilot['rows']} samples ({d.pilot['groups']} groups of "
             f"{d.pilot['group']}):"]
    if d.steps.signal > 0:
        top = sorted(range(len(d.steps.share)), key=lambda i: -d.steps.share[i])[:5]
        lines.append("  largest shares of the signal: " + ", ".join(f"step {i + 1} {d.steps.share[i]:.0%}"
                                                                  for i in top))
        s = d.steps.suggest()
        lines.append(f"  90% of the signal: steps {s['steps']}; shortest window {s['window']}")
    else:
        lines.append(f"  {UNRESOLVED}")
    lines.append(f"smallest batch for cos >= {d.target} with the true gradient (and evaluations per update):")
    for c in d.curves:
        B = c.smallest_batch(d.target)
        per = d.cost.get(c.name, math.nan)
        lines.append(f"  {c.name}, group {c.group}: " + (f"B = {B} ({B * per:,.0f} evaluations)" if B else
                                                        _never(c)))
    reach = [(c.smallest_batch(d.target) * d.cost.get(c.name, math.nan), c) for c in d.curves
             if c.smallest_batch(d.target)]
    if reach:
        cost, c = min(reach, key=lambda x: x[0])
        lines.append(f"  cheapest: {c.name} with groups of {c.group} and B = {c.smallest_batch(d.target)} "
                     f"({cost:,.0f} evaluations per update)")
    for name, rows in d.ratio.items():
        worst = max((max(r[p]["log_ratio"] for p in r if isinstance(r[p], dict)) for r in rows), default=0.0)
        lines.append(f"ratio check ({name}): largest |log r| at theta = theta_old over all steps and passes: "
                     f"{worst:.2e}")
    lines.append(f"spent {d.spent:,} of a budget of {d.budget:,} evaluations")
    return "\n".join(lines)


def _never(c) -> str:
    if not c.truth > 0:
        return "undetermined: the pilot does not resolve the gradient (give a larger budget)"
    return f"never (its cosine tends to {c.limit:.2f})"


def to_json(d: Diagnosis, config: dict) -> dict:
    """The diagnosis as plain JSON values."""
    return {"kind": d.kind, "pilot": d.pilot, "spent": d.spent, "budget": d.budget, "target": d.target,
            "config": config,
            "steps": [{"step": t + 1, "share": finite(d.steps.share[t]), "cosine": finite(d.steps.cosine[t]),
                       "spread": finite(d.steps.spread[t])} for t in range(len(d.steps.share))],
            "suggestion": d.steps.suggest() if d.steps.signal > 0 else None,
            "curves": [{"estimator": c.name, "group": c.group, "evaluations_per_sample": finite(d.cost.get(c.name)),
                        "limit": finite(c.limit), "smallest_batch": c.smallest_batch(d.target),
                        "cosine": {str(B): [finite(c.cosine(B)), *map(finite, c.interval(B))]
                                   for B in BATCHES if B % c.group == 0}} for c in d.curves],
            "ratio": d.ratio}


def markdown(d: Diagnosis, plots: bool) -> str:
    """``diagnosis.md``: the tables of :func:`to_json`, with the plots where drawn."""
    out = ["# Diagnosis", "", f"Per-step {d.kind} terms from {d.pilot['rows']} samples ({d.pilot['groups']} prompt "
           f"groups of {d.pilot['group']}); {d.spent:,} evaluations spent of a budget of {d.budget:,}.", "",
           "## Which steps carry the gradient", "",
           "Share of the signal |E g|^2 (adds up to 1), cosine of the step's mean with the whole gradient, and the "
           "spread tr Cov per sample. Step T is generated first, step 1 last.", ""]
    if plots:
        out += ["![per-step shares](steps.png)", ""]
    out += ["| step | share | cosine | spread |", "|---:|---:|---:|---:|"]
    out += [f"| {t + 1} | {d.steps.share[t]:.3f} | {d.steps.cosine[t]:.3f} | {d.steps.spread[t]:.3g} |"
            for t in range(len(d.steps.share))]
    s = d.steps.suggest()
    out += ["", f"90% of the signal lies on steps {s['steps']}; the shortest window that carries it is "
                f"{s['window']}." if d.steps.signal > 0 else f"Note: {UNRESOLVED}.", "", "## Batch and group size", "",
            "cos(B): the expected cosine between a batch's estimate and the true gradient, with a 95% bootstrap "
            f"interval; the smallest batch reaching {d.target}, and its evaluations per update (the model's counted "
            "calls).", ""]
    if plots:
        out += ["![cosine against batch size](batch.png)", ""]
    shown = (8, 32, 128, 512)
    out += ["| estimator | group | " + " | ".join(f"cos({B})" for B in shown) + " | limit | smallest B | evaluations |",
            "|---|---:|" + "---:|" * (len(shown) + 3)]
    for c in d.curves:
        cells = []
        for B in shown:
            lo, hi = c.interval(B)
            cells.append(f"{c.cosine(B):.2f} [{lo:.2f}, {hi:.2f}]" if B % c.group == 0 else "")
        B = c.smallest_batch(d.target)
        per = d.cost.get(c.name, math.nan)
        out.append(f"| {c.name} | {c.group} | " + " | ".join(cells) + f" | {c.limit:.2f} | "
                   f"{B or ('never' if c.truth > 0 else 'undetermined')} | "
                   f"{'' if not B else f'{B * per:,.0f}'} |")
    out += ["", "## Ratio consistency", "",
            "Per step: the gap between the rollout's step mean and the mean a training pass recomputes at theta = "
            "theta_old (RMS over the latent, in units of sigma_t, largest over samples), and the log-ratio it "
            "implies (largest |log r|; 0 when the passes agree). halforder's likelihood-ratio terms use the drawn "
            "noise, so the engine's REINFORCE does not form this ratio; the clipped ratio does.", ""]
    for name, rows in d.ratio.items():
        passes = [p for p in rows[0] if isinstance(rows[0][p], dict)] if rows else []
        out += [f"### {name}", "", "| step | sigma | " + " | ".join(f"{p}: gap / log r" for p in passes) + " |",
                "|---:|---:|" + "---:|" * len(passes)]
        out += [f"| {r['step']} | {r['sigma']:.3g} | " + " | ".join(f"{r[p]['gap']:.1e} / {r[p]['log_ratio']:.1e}"
                                                                   for p in passes) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def draw(d: Diagnosis, folder: str) -> None:
    """``steps.png`` (per-step shares) and ``batch.png`` (cos(B) with intervals per estimator)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(d.steps.share)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(1, T + 1), d.steps.share)
    ax.set(xlabel="step t (T is generated first)", ylabel="share of |E g|^2", title="Which steps carry the gradient")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "steps.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in d.curves:
        Bs = [B for B in BATCHES if B % c.group == 0]
        ys = [c.cosine(B) for B in Bs]
        lo, hi = zip(*(c.interval(B) for B in Bs))
        line, = ax.plot(Bs, ys, marker="o", ms=3, label=f"{c.name}, G={c.group}")
        ax.fill_between(Bs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(d.target, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="batch size B", ylabel="E cos(estimate, true gradient)", ylim=(0, 1))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "batch.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``halforder diagnose``; returns the exit status (2 on bad input)."""
    from .cli import did_you_mean, parser
    from .config import load_config

    p = parser()
    p.prog, p.description = "halforder diagnose", __doc__.split("\n\n")[0]
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {did_you_mean(message)}\n")   # one line
    p.usage = "halforder diagnose [--config FILE] [--preset NAME] [--budget N] [--out DIR] [--FLAG VALUE ...]"
    p.add_argument("--budget", type=int, default=None,
                   help=f"evaluations the diagnosis may spend (default: {RUN_SHARE:.0%} of the run's)".replace("%", "%%"))
    p.add_argument("--target", type=float, default=0.5, help="the cosine the smallest batch must reach (default 0.5)")
    p.add_argument("--out", default=os.path.join("runs", "diagnosis"), help="where diagnosis.md and .json go")
    try:
        given = vars(p.parse_args(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:                  # --help, or a flag argparse refuses (one line)
        return int(e.code or 0)
    path, budget, target, out = given.pop("config", None), given.pop("budget"), given.pop("target"), given.pop("out")
    try:
        if not 0 < target < 1:
            raise ValueError(f"--target must lie in (0, 1), got {target}")
        if os.path.exists(out) and os.listdir(out):
            raise ValueError(f"--out {out!r} is not empty: give a new folder")
        cfg = load_config(path, given)
        kind_of(cfg.estimator)
        cfg = dataclasses.replace(cfg, output_dir=None, resume=None)
        from .run import prepare
        prepared = prepare(cfg)
        default = math.floor(RUN_SHARE * run_evaluations(cfg, prepared.sampler))
        budget = default if budget is None else budget
        if budget < 1:
            raise ValueError(f"--budget must be a positive number of evaluations, got {budget}")
        tasks = {cfg.mixed_precision if cfg.mixed_precision != "no" else "float32": prepared.task}
        if cfg.mixed_precision != "bf16":
            tasks["bf16"] = prepare(dataclasses.replace(cfg, mixed_precision="bf16")).task
        run = lambda: diagnose(prepared.task, prepared.sampler, prepared.prompts, estimator=cfg.estimator,
                               budget=budget, group_size=cfg.group_size, baseline=cfg.baseline,
                               global_std=cfg.global_std, target=target, seed=cfg.seed, ratio_tasks=tasks,
                               progress=lambda line: print(f"halforder diagnose: {line}", file=sys.stderr))
        d = run()
    except (ValueError, OSError) as e:
        hint = " (the default is 2% of the run's evaluations: pass --budget N)" if "budget" in str(e) and \
            budget is not None and given.get("budget") is None else ""
        print(f"halforder diagnose: error: {e}{hint}", file=sys.stderr)
        return 2
    print(summary(d))
    plots = _has_matplotlib()
    with atomic_dir(out) as tmp:
        if plots:
            draw(d, tmp)
        write_text(os.path.join(tmp, "diagnosis.md"), markdown(d, plots) + ("" if plots else
                   "\n(plots need the plots extra: pip install -e \".[plots]\")\n"))
        write_text(os.path.join(tmp, "diagnosis.json"), json.dumps(to_json(d, cfg.to_dict()), indent=1) + "\n")
    print(f"wrote {os.path.join(out, 'diagnosis.md')} and diagnosis.json")
    return 0


def _has_matplotlib() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None
