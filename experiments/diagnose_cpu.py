"""Does ``halforder diagnose`` predict the CPU learning experiment? Its predicted cos(8) per
method, against cosines measured on independent batches, beside the learning results.

On the model, reward, chain (T, eta) and LoRA start of :mod:`experiments.finetune_cpu`, at
the initial weights, for each method that the diagnosis covers (the backprop families and
REINFORCE with a leave-one-out or GRPO advantage):

- predicted: cos(8) and its 95% bootstrap interval from a diagnose pilot
  (:func:`halforder.planning.diagnose.diagnose`, within a stated budget of evaluations that
  its compute meter counts). The backprop methods' pilots share one seed, so they draw the
  same rows; REINFORCE's one pilot gives both advantages (diagnose reports the field's
  variants from the same scores).
- measured: ``batches`` independent batches of 8, each the method's estimate by
  :func:`halforder.estimators.estimate` with a plan drawn by its sampler (one per batch, as
  the training loop draws) and its baseline; the mean of their cosines with a reference
  gradient (full backprop over ``reference`` samples), with its standard error.
- the formula on the same batches: mean <g_B, m_ref> / (|m| RMS |g_B|), with |m|^2 from the
  reference without its noise (a U-statistic over its chunks). It shares the formula with the
  prediction but not the pilot: the gap to the prediction is the pilot's error, the gap to the
  measured mean the formula's (a ratio of root mean squares, not a mean of ratios).

The learning results (AUC, final reward; 5 seeds) come from the committed
``finetune_results.json``. The Spearman rank correlation between predicted cos(8) and AUC is
reported with its n and an exact permutation p-value.

    python experiments/diagnose_cpu.py           # docs/results/diagnose_cpu.{md,csv,png}
    python experiments/diagnose_cpu.py --quick   # smoke test into runs/diagnose-quick/
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import REPO, pyplot, require_extras, save_fig, write_table  # noqa: E402

if __name__ == "__main__":   # at once, before the imports below need them
    require_extras("plots", "diffusion")

from experiments.finetune_cpu import METHODS, QUICK, ExperimentConfig, methods  # noqa: E402
from experiments.shapes.world import UNCONDITIONAL, build_setup  # noqa: E402
from halforder.estimators import ComputeMeter, Plan, estimate, flatten  # noqa: E402
from halforder.planning.diagnose import diagnose, kind_of  # noqa: E402
from halforder.planning.diagnosis import trace_covariance, unbiased_dot  # noqa: E402

RUN = "the run's"
#: method -> (the diagnose estimator family, the curve that is the method at batch size G = batch)
COVERED = {"full": ("full", "full backprop"), "draft1": ("truncated", RUN), "alignprop": ("truncated_random", RUN),
           "reinforce": ("reinforce", "reinforce, leave-one-out"),
           "reinforce_grpo": ("reinforce", "reinforce, GRPO (group std)")}


@dataclass(frozen=True)
class DiagnoseConfig:
    """The validation's sizes.

    Attributes:
      experiment: the learning experiment whose model, reward, chain and batch are used.
      pilot_pathwise: diagnose's budget (evaluations) for each backprop method.
      pilot_reinforce: diagnose's budget for REINFORCE (one pilot for both advantages).
      batches: independent batches per method for the measured cosines.
      reference: full-backprop samples of the reference gradient, in chunks of ``chunk``.
      seed: the pilots' seed; the reference and the batches draw from seeds above it (every
        method's batches from the same one: common random numbers).
    """

    experiment: ExperimentConfig = ExperimentConfig()
    pilot_pathwise: int = 4000
    pilot_reinforce: int = 15360
    batches: int = 64
    reference: int = 1000
    chunk: int = 40
    seed: int = 0


QUICK_CFG = DiagnoseConfig(experiment=QUICK, pilot_pathwise=2 * QUICK.T * 24, pilot_reinforce=3 * QUICK.T * 8 * 3,
                           batches=3, reference=16, chunk=8)


def family(name: str) -> str:
    """The estimator family of a method of :mod:`experiments.finetune_cpu`."""
    if name in COVERED:
        return COVERED[name][0]
    if name.startswith("zeroth_order"):
        return "zeroth_order"
    return "rlr_no_zo" if name.endswith("noZO") else "rlr"


def predict(setup, cfg: DiagnoseConfig) -> dict:
    """Per covered method: diagnose's cos(batch), its interval and limit, the share of bootstrap
    replicates that give a cosine at all (the others have no signal left: the interval is over
    the rest), the per-step shares, and the pilot's size and counted cost."""
    B, T = cfg.experiment.batch, cfg.experiment.T
    table, pilots = methods(T), {}
    out = {}
    for name, (est, curve_name) in COVERED.items():
        key = est if est == "reinforce" else name
        if key not in pilots:
            m = table[name]
            pilots[key] = diagnose(setup.task(), m.sampler, UNCONDITIONAL, estimator=est,
                                   budget=cfg.pilot_reinforce if est == "reinforce" else cfg.pilot_pathwise,
                                   group_size=B if est == "reinforce" else None, baseline=m.baseline, seed=cfg.seed)
        d = pilots[key]
        group = B if est == "reinforce" else 1
        c = next(c for c in d.curves if c.group == group and c.name.startswith(curve_name))
        _, truth, own, spread = c.boot.unbind(1)
        out[name] = {"predicted": c.cosine(B), "interval": c.interval(B), "limit": c.limit, "curve": c.name,
                     "pilot_rows": d.pilot["rows"], "pilot_spent": d.spent, "pilot_budget": d.budget,
                     "shared_pilot": key != name, "shares": d.steps.share,
                     "resolved": float(((truth > 0) & (own + spread * group / B > 0)).double().mean()),
                     "suggest": d.steps.suggest() if d.steps.signal > 0 else None}
    return out


def reference(setup, cfg: DiagnoseConfig) -> dict:
    """The reference gradient: full backprop over ``cfg.reference`` samples in chunks; |m|^2
    without the noise (U-statistic over chunk means) and the reference's own squared error."""
    task, T = setup.task(), cfg.experiment.T
    plan, g = Plan.full(T), torch.Generator().manual_seed(cfg.seed + 999)
    rows = []
    with ComputeMeter() as meter:
        for _ in range(cfg.reference // cfg.chunk):
            chain = task.chain(plan, UNCONDITIONAL * cfg.chunk, g)
            rows.append(flatten(estimate(chain, plan, task.params, chain.sample_start(cfg.chunk, g), generator=g).grad))
    return reference_stats(torch.stack(rows), cfg.chunk, meter.total)


def reference_stats(Y: torch.Tensor, chunk: int, spent: int) -> dict:
    """A reference gradient from its chunk means ``Y`` [chunks, P] (``chunk`` samples each): the
    mean m, |m|^2 without the noise (U-statistic over the chunks), the mean's own squared error
    and its cosine with the true gradient (about sqrt(|m|^2 / (|m|^2 + error)))."""
    Y = Y.double()
    signal, error = float(unbiased_dot(Y, Y)), float(trace_covariance(Y)) / len(Y)
    return {"m": Y.mean(0), "signal": signal, "error": error, "samples": len(Y) * chunk,
            "cosine": math.sqrt(signal / (signal + error)) if signal > 0 else math.nan, "spent": spent}


def measure(setup, cfg: DiagnoseConfig, name: str, ref: dict, seed: int) -> dict:
    """``cfg.batches`` independent estimates of method ``name`` at the experiment's batch size,
    each from a plan its sampler draws: the mean cosine with the reference (its standard error,
    and divided by the reference's own cosine with the truth), the formula's value on the same
    batches (module docstring) with a bootstrap standard error, and the batches' RMS norm over
    their median norm (how far a few batches dominate the formula's mean square)."""
    method = methods(cfg.experiment.T)[name]
    task, B = setup.task(), cfg.experiment.batch
    g = torch.Generator().manual_seed(seed)
    state, rows = method.sampler.init(), []
    with ComputeMeter() as meter:
        for _ in range(cfg.batches):
            plan = method.sampler.sample(state, g)
            chain = task.chain(plan, UNCONDITIONAL * B, g)
            est = estimate(chain, plan, task.params, chain.sample_start(B, g), generator=g, baseline=method.baseline)
            rows.append(flatten(est.grad))
    return {**compare(torch.stack(rows), ref, seed), "spent": meter.total}


def compare(X: torch.Tensor, ref: dict, seed: int) -> dict:
    """Independent batch estimates ``X`` [batches, P] against a reference (:func:`reference_stats`):
    their mean cosine with it (its standard error, and divided by the reference's own cosine),
    the formula mean <g_B, m_ref> / (|m| RMS |g_B|) on them with a bootstrap standard error
    (200 resamples, seeded by ``seed + 1``), and their RMS norm over their median norm."""
    X, m = X.double(), ref["m"]
    dots, sq = X @ m, X.pow(2).sum(1)
    cos = dots / (sq.sqrt() * m.norm())
    norm = math.sqrt(ref["signal"]) if ref["signal"] > 0 else math.nan
    formula = (lambda d, s: float(d.mean() / (norm * s.mean().sqrt())))  # noqa: E731
    idx = torch.randint(len(X), (200, len(X)), generator=torch.Generator().manual_seed(seed + 1))
    boot = torch.tensor([formula(dots[i], sq[i]) for i in idx])
    norms = sq.sqrt()
    return {"measured": float(cos.mean()), "measured_se": float(cos.std() / math.sqrt(len(cos))),
            "corrected": float(cos.mean()) / ref["cosine"],
            "norm_tail": float(norms.pow(2).mean().sqrt() / norms.median()),
            "formula": formula(dots, sq), "formula_se": float(boot.std()), "batches": len(X)}


def learning(path: Path) -> tuple[dict, dict | None]:
    """Per method of the committed learning results: AUC and final reward (mean, 95% half-width),
    updates and the run's label; and the run's config. ``({}, None)`` where the file is missing."""
    if not path.exists():
        return {}, None
    with open(path) as f:
        saved = json.load(f)
    return {name: {"auc": tuple(row["auc"]), "reward": tuple(row["reward"]), "updates": row["steps"],
                   "label": row["label"]} for name, row in saved["table"].items()}, saved["config"]


def spearman(x: list[float], y: list[float]) -> dict:
    """Spearman's rho (scipy) with n and the exact two-sided permutation p-value (every
    ordering of y; n <= 8)."""
    from scipy import stats

    rho = float(stats.spearmanr(x, y).statistic)
    n = len(x)
    if n > 8 or math.isnan(rho):
        return {"rho": rho, "n": n, "p": math.nan}
    rx = stats.rankdata(x)
    perms = [float(stats.spearmanr(rx, p).statistic) for p in itertools.permutations(stats.rankdata(y))]
    return {"rho": rho, "n": n, "p": sum(abs(r) >= abs(rho) - 1e-12 for r in perms) / len(perms)}


def fmt_ci(mean: float, half: float) -> str:
    """``mean ± half`` with three decimals."""
    return f"{mean:.3f} ± {half:.3f}"


def write(out: Path, cfg: DiagnoseConfig, rows: dict, ref: dict, learned: dict, rank: dict, rank_measured: dict,
          not_covered: dict, wall: float, source: str) -> None:
    """diagnose_cpu.md and .csv: the table, the reference's error, the rank correlation, the
    methods not covered, and what it all spent."""
    e = cfg.experiment
    header = ["method", "estimator (curve)", "label", "pilot rows", "pilot evaluations", "predicted cos(8)",
              "95% interval low", "95% interval high", "replicates with a cosine", "limit (B -> inf)",
              "formula on the batches", "formula SE", "measured mean cos(8)", "measured SE",
              "measured / reference cosine", "RMS norm / median norm", "updates in the run", "AUC",
              "AUC half-width", "final reward", "final reward half-width"]
    table, nan2 = [], (math.nan, math.nan)
    for name, r in rows.items():
        L = learned.get(name, {})
        table.append([name, r["curve"], L.get("label", ""), r["pilot_rows"],
                      f"{r['pilot_spent']}" + (" (shared)" if r["shared_pilot"] else ""), round(r["predicted"], 4),
                      round(r["interval"][0], 4), round(r["interval"][1], 4), round(r["resolved"], 3),
                      round(r["limit"], 4), round(r["formula"], 4), round(r["formula_se"], 4), round(r["measured"], 4),
                      round(r["measured_se"], 4), round(r["corrected"], 4), round(r["norm_tail"], 3),
                      L.get("updates"), *(round(v, 4) for v in (*L.get("auc", nan2), *L.get("reward", nan2)))])
    write_table(out, "diagnose_cpu", header, table)
    lines = ["# Does the diagnosis predict the CPU learning experiment?", "",
             f"The model, reward and chain of the CPU learning experiment (T = {e.T}, eta = {e.eta}, LoRA rank "
             f"{e.lora_rank}), at the initial weights, batch {e.batch}. Predicted: `halforder.planning.diagnose` "
             f"with a budget of {cfg.pilot_pathwise:,} evaluations per backprop method and {cfg.pilot_reinforce:,} for "
             "REINFORCE (one pilot gives both advantages; the backprop pilots share a seed, so they draw the same "
             "rows); "
             f"one run of the learning experiment spends {e.budget:,}. Interval: the pilot's 95% bootstrap interval. "
             f"Measured: the mean cosine of {cfg.batches} independent batches of {e.batch} (each through "
             "`halforder.estimators.estimate`, with a plan drawn by the method's sampler for each batch, as the "
             f"training loop draws) with a reference gradient of {ref['samples']:,} full-backprop samples, ± one "
             "standard error. Formula on the batches: mean <g_B, m_ref> / (|m| RMS |g_B|), the prediction's formula "
             "on the measured batches (± a bootstrap standard error). AUC and final reward: mean ± 95% t-interval "
             f"over 5 seeds, from {source}.", "",
             "| method | predicted cos(8) [95%] (replicates with a cosine) | limit | formula on the batches | measured "
             "mean cos(8) | ÷ reference's cosine | RMS / median norm | updates | AUC | final reward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["predicted"]):
        L = learned.get(name, {})
        learnt = f"{L['updates']:.0f} | {fmt_ci(*L['auc'])} | {fmt_ci(*L['reward'])} |" if L else "n/a | n/a | n/a |"
        lines.append(f"| {name} ({L.get('label', '')}) | {r['predicted']:.3f} [{r['interval'][0]:.3f}, "
                     f"{r['interval'][1]:.3f}] ({r['resolved']:.0%}) | {r['limit']:.3f} | {r['formula']:.3f} ± "
                     f"{r['formula_se']:.3f} | {r['measured']:.3f} ± {r['measured_se']:.3f} | {r['corrected']:.3f} | "
                     f"{r['norm_tail']:.2f} | " + learnt)
    lines += ["", "## Which steps carry the signal", "",
              "Each step's share of |E g|^2 at the initial weights, from the pilots (step 1 is generated last); both "
              "estimate the same gradient, one from pathwise terms and one from likelihood-ratio terms.", "",
              "| step | " + " | ".join(f"{n} pilot" for n in ("full", "reinforce")) + " |", "|---:|---:|---:|"]
    lines += [f"| {t + 1} | " + " | ".join(f"{rows[n]['shares'][t]:.3f}" for n in ("full", "reinforce")) + " |"
              for t in range(e.T)]
    lines += [""] + [f"- {n} pilot: 90% of the signal on steps {rows[n]['suggest']['steps']}, shortest window "
                     f"{rows[n]['suggest']['window']}." if rows[n]["suggest"] else
                     f"- {n} pilot: the signal is not resolved." for n in ("full", "reinforce")]
    lines += ["", "## The reference's own error", "",
              f"|m|^2 = {ref['signal']:.4g} (without the noise), the reference's squared error E|m_ref - m|^2 = "
              f"{ref['error']:.3g}: a relative error of {math.sqrt(ref['error'] / ref['signal']):.3f} and a cosine "
              f"with the true gradient of about {ref['cosine']:.4f}, which lowers every measured cosine by that factor "
              "(to first order) and leaves the formula's values unbiased.", "", "## Rank correlation", ""]
    for label, r in (("predicted cos(8)", rank), ("measured mean cos(8)", rank_measured)):
        if r:
            lines.append(f"- Spearman's rho between {label} and the learning AUC: {r['rho']:.2f} (n = {r['n']} "
                         f"methods; exact permutation p = {r['p']:.2f}).")
    lines += ["", "## Not covered", "",
              "diagnose measures the backprop families and REINFORCE/GRPO; for the others it says to use "
              "`halforder plan`, which measures their parts' variances:", ""]
    lines += [f"- {name} ({fam})" + (f": AUC {fmt_ci(*learned[name]['auc'])}" if name in learned else "")
              for name, fam in not_covered.items()]
    spent_p = sum(r["pilot_spent"] for r in rows.values() if not r["shared_pilot"])
    spent_m = sum(r["spent"] for r in rows.values())
    lines += ["", "## Compute", "",
              f"Counted evaluations: pilots {spent_p:,}, measured batches {spent_m:,}, reference {ref['spent']:,}. "
              f"Wall time {wall:.0f} s on one thread of a shared 2-core machine.", "",
              "![predicted against measured](diagnose_cpu.png)"]
    (out / "diagnose_cpu.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows: dict, learned: dict, rank: dict) -> None:
    """Predicted against measured cos(8) (and the formula on the batches), and predicted cos(8)
    against the learning AUC."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    for i, (name, r) in enumerate(rows.items()):
        lo, hi = r["interval"]
        ax.errorbar(r["measured"], r["predicted"], xerr=1.96 * r["measured_se"],
                    yerr=[[max(r["predicted"] - lo, 0)], [max(hi - r["predicted"], 0)]], fmt="o", color=f"C{i}",
                    label=name, capsize=3)
        ax.plot(r["measured"], r["formula"], marker="x", color=f"C{i}", ls="none")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="measured mean cos(8) on independent batches", ylabel="predicted cos(8) (o, 95% interval); "
           "formula on the batches (x)", xlim=(-0.02, 1), ylim=(-0.02, 1), title="Prediction against measurement")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, (name, r) in enumerate(rows.items()):
        if name in learned:
            mean, half = learned[name]["auc"]
            ax.errorbar(r["predicted"], mean, yerr=half, fmt="o", color=f"C{i}", capsize=3)
            ax.annotate(name, (r["predicted"], mean), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="predicted cos(8) at the initial weights", ylabel="learning AUC (mean reward over the budget)",
           title=f"Spearman rho = {rank.get('rho', math.nan):.2f} (n = {rank.get('n', 0)})")
    fig.tight_layout()
    save_fig(fig, out, "diagnose_cpu")


def main(argv=None) -> dict:
    """Run the validation (module docstring), write its outputs and return its numbers."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test (writes to runs/)")
    p.add_argument("--out", help="output folder (default docs/results; with --quick, runs/diagnose-quick)")
    p.add_argument("--cache", help="weights cache (default experiments/cache; with --quick, runs/cache)")
    p.add_argument("--results", default=str(REPO / "docs" / "results" / "finetune_results.json"),
                   help="the learning experiment's results (default: the committed ones)")
    args = p.parse_args(argv)
    out = Path(args.out or (REPO / "runs" / "diagnose-quick" if args.quick else REPO / "docs" / "results"))
    cache = args.cache or str(REPO / "runs" / "cache" if args.quick else REPO / "experiments" / "cache")
    cfg = QUICK_CFG if args.quick else DiagnoseConfig()
    torch.set_num_threads(int(os.environ.get("HALFORDER_THREADS", "1")))
    t0 = time.perf_counter()
    setup = build_setup(cfg.experiment, cache)
    rows = predict(setup, cfg)
    ref = reference(setup, cfg)
    for name in rows:
        rows[name].update(measure(setup, cfg, name, ref, cfg.seed + 1000))
    learned, saved = learning(Path(args.results))
    source = os.path.relpath(args.results, REPO) if saved else "nowhere (no results file)"
    if saved and any(saved[k] != getattr(cfg.experiment, k) for k in ("T", "eta", "batch")):
        source += " (a run with other settings than this one's)"
    names = [n for n in rows if n in learned]
    auc = [learned[n]["auc"][0] for n in names]
    rank = spearman([rows[n]["predicted"] for n in names], auc) if len(names) > 2 else {}
    rank_measured = spearman([rows[n]["measured"] for n in names], auc) if len(names) > 2 else {}
    not_covered = {}
    for name in METHODS:
        if name not in COVERED:
            try:
                kind_of(family(name))
            except ValueError:
                not_covered[name] = family(name)
    wall = time.perf_counter() - t0
    write(out, cfg, rows, ref, learned, rank, rank_measured, not_covered, wall, source)
    plot(out, rows, learned, rank)
    summary = {"config": dataclasses.asdict(cfg), "rows": rows,
               "reference": {k: v for k, v in ref.items() if k != "m"}, "spearman": rank,
               "spearman_measured": rank_measured, "not_covered": not_covered, "wall_seconds": wall}
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
