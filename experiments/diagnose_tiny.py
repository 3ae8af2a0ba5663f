"""Does ``halforder diagnose`` predict the cosine of a batch's estimate on the tiny presets?
Predicted cos(B) against the mean cosine of independent batches, for the SD UNet (``tiny``)
and SD3 (``tiny-sd3``) presets.

The same validation as :mod:`experiments.diagnose_cpu`, on the tasks that ``halforder
diagnose --preset tiny|tiny-sd3`` builds (``prepare`` of :mod:`halforder.diffusion.app.run`), at
their initial weights, for full backprop and REINFORCE (leave-one-out advantage, prompt groups
of 4), at batch sizes B = 8 and 32:

- predicted: cos(B) and its 95% bootstrap interval from a diagnose pilot
  (:func:`halforder.planning.diagnose.diagnose`) of ``pilot_rows`` samples; its budget is what
  such a pilot costs (:func:`halforder.planning.diagnose.pilot_cost`), stated in the table.
- measured: independent batches of B, each the estimator's estimate by
  :func:`halforder.estimators.estimate` (``per_sample=False``, one plan drawn by the run's
  sampler per batch), with prompts and start noise drawn as the training loop draws them
  (:meth:`halforder.training.update_rules.Draws.micro_batches`: B / 4 prompts, each for a group
  of 4, for REINFORCE; B independent prompts for full backprop): the mean of their cosines with
  a reference gradient (full backprop over ``reference`` samples), with its standard error.
- the formula on the same batches (:func:`experiments.diagnose_cpu.compare`).

Both estimators must estimate the same gradient for one reference to serve both, so every
step gets the preset's ``eta_plan`` as its eta (``eta`` a number, not ``"plan"``): with the
presets' default ``eta = "plan"`` full backprop would run the deterministic sampler (eta = 0),
another objective than REINFORCE's. The full run takes about 4 minutes on one thread.

    python experiments/diagnose_tiny.py           # docs/results/diagnose_tiny.{md,csv}
    python experiments/diagnose_tiny.py --quick   # smoke test into runs/diagnose-tiny-quick/
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import REPO, require_extras, write_table  # noqa: E402

if __name__ == "__main__":   # at once, before the imports below need them
    require_extras("diffusion")

from experiments.diagnose_cpu import compare, reference_stats  # noqa: E402
from halforder.estimators import ComputeMeter, Plan, estimate, flatten  # noqa: E402
from halforder.planning.diagnose import diagnose, kind_of, pilot_cost  # noqa: E402
from halforder.training.update_rules import Draws  # noqa: E402

#: estimator -> the diagnose curve that is it
CURVES = {"full": "full backprop", "reinforce": "reinforce, leave-one-out"}


@dataclass(frozen=True)
class TinyConfig:
    """The validation's sizes.

    Attributes:
      presets, estimators: what is measured (every pair).
      group: REINFORCE's prompt group (samples per prompt) and leave-one-out group.
      batches: (batch size B, independent batches measured at B) pairs.
      pilot_rows: the diagnose pilot's samples (its budget is their cost).
      reference: full-backprop samples of the reference gradient, in chunks of ``chunk``.
      seed: the pilots' seed; the reference and the batches draw from seeds above it (both
        estimators' batches from the same one).
    """

    presets: tuple[str, ...] = ("tiny", "tiny-sd3")
    estimators: tuple[str, ...] = ("full", "reinforce")
    group: int = 4
    batches: tuple[tuple[int, int], ...] = ((8, 128), (32, 48))
    pilot_rows: int = 512
    reference: int = 2400
    chunk: int = 40
    seed: int = 0


QUICK_CFG = TinyConfig(batches=((8, 3), (32, 2)), pilot_rows=24, reference=32, chunk=8)


def build(preset: str, estimator: str, group: int | None):
    """The prepared run (task, sampler, prompts) of ``preset`` with ``estimator``, its eta the
    preset's ``eta_plan`` at every step, and the config."""
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import prepare

    eta = load_config(None, {"preset": preset}).eta_plan
    cfg = load_config(None, {"preset": preset, "estimator": estimator, "group_size": group, "eta": str(eta)})
    cfg = dataclasses.replace(cfg, output_dir=None, resume=None)
    return prepare(cfg), cfg


def draws(batch: int, group: int | None, seed: int) -> tuple[Draws, SimpleNamespace]:
    """The training loop's draws of one batch and their generators (prompts and noise)."""
    rng = SimpleNamespace(data=torch.Generator().manual_seed(seed), noise=torch.Generator().manual_seed(seed + 1))
    return Draws(batch, 1, group, "none", "loo"), rng


def batch_estimates(run, draw: Draws, rng, count: int, reinforce: bool) -> tuple[torch.Tensor, int]:
    """``count`` independent batch estimates [count, P] (one plan drawn by the run's sampler per
    batch) and the evaluations they counted."""
    params = {k: v.detach() for k, v in run.task.trainable().items()}
    state, rows = run.sampler.init(), []
    with ComputeMeter() as meter:
        for _ in range(count):
            plan = run.sampler.sample(state, rng.noise)
            for chain, x_T, pairing in draw.micro_batches(run.task, plan, run.prompts, rng):
                est = estimate(chain, plan, params, x_T, generator=rng.noise, pairing=pairing,
                               baseline=draw.advantage() if reinforce else None, per_sample=False)
                rows.append(flatten(est.grad))
    return torch.stack(rows), meter.total


def reference(run, cfg: TinyConfig) -> dict:
    """Full backprop over ``cfg.reference`` samples (independent prompts), in chunks: the
    reference gradient and its own error (:func:`experiments.diagnose_cpu.reference_stats`)."""
    full = SimpleNamespace(task=run.task, prompts=run.prompts,
                           sampler=SimpleNamespace(init=lambda: None, sample=lambda s, g: Plan.full(run.task.T)))
    draw, rng = draws(cfg.chunk, None, cfg.seed + 999)
    Y, spent = batch_estimates(full, draw, rng, cfg.reference // cfg.chunk, reinforce=False)
    return reference_stats(Y, cfg.chunk, spent)


def predict(run, estimator: str, cfg: TinyConfig) -> tuple[dict, object]:
    """diagnose's pilot of ``cfg.pilot_rows`` samples: per batch size, cos(B), its interval and
    the share of bootstrap replicates that give a cosine at all; and the pilot's size and cost."""
    T, reinforce = run.task.T, estimator == "reinforce"
    budget = pilot_cost(kind_of(estimator), T, cfg.pilot_rows, 0, 0)
    d = diagnose(run.task, run.sampler, run.prompts, estimator=estimator, budget=budget,
                 group_size=cfg.group if reinforce else None, baseline="loo", seed=cfg.seed)
    G = cfg.group if reinforce else 1
    c = next(c for c in d.curves if c.group == G and c.name == CURVES[estimator])
    _, truth, own, spread = c.boot.unbind(1)
    out = {B: {"predicted": c.cosine(B), "interval": c.interval(B), "limit": c.limit,
               "resolved": float(((truth > 0) & (own + spread * G / B > 0)).double().mean())}
           for B, _ in cfg.batches}
    return out, {"rows": d.pilot["rows"], "spent": d.spent, "budget": d.budget}


def write(out: Path, cfg: TinyConfig, rows: list[dict], refs: dict, wall: float) -> None:
    """diagnose_tiny.md and .csv: the table, the references' errors and what it all spent."""
    header = ["preset", "estimator", "B", "pilot rows", "pilot evaluations", "predicted cos(B)", "95% interval low",
              "95% interval high", "replicates with a cosine", "limit (B -> inf)", "formula on the batches",
              "formula SE", "batches", "measured mean cos(B)", "measured SE", "measured / reference cosine",
              "RMS norm / median norm"]
    table = [[r["preset"], r["estimator"], r["B"], r["pilot_rows"], r["pilot_spent"], round(r["predicted"], 4),
              round(r["interval"][0], 4), round(r["interval"][1], 4), round(r["resolved"], 3), round(r["limit"], 4),
              round(r["formula"], 4), round(r["formula_se"], 4), r["batches"], round(r["measured"], 4),
              round(r["measured_se"], 4), round(r["corrected"], 4), round(r["norm_tail"], 3)] for r in rows]
    write_table(out, "diagnose_tiny", header, table)
    sizes = ", ".join(f"{n} batches of {B}" for B, n in cfg.batches)
    lines = ["# Does the diagnosis predict the tiny presets?", "",
             "The tasks of `halforder diagnose --preset tiny` (SD UNet, T = 6) and `--preset tiny-sd3` (SD3, T = 4) "
             "at their initial weights, every step with the preset's `eta_plan` as its eta (so that full backprop "
             "and REINFORCE estimate one gradient). Predicted: `halforder.planning.diagnose` with a pilot of "
             f"{cfg.pilot_rows} samples, its budget exactly that pilot's cost (column 'pilot evaluations'); "
             "REINFORCE's pilot draws prompt groups of 8 and its curve takes groups of "
             f"{cfg.group}. Interval: the pilot's 95% bootstrap interval (a replicate without signal "
             "counts as cosine 0; the share that give a cosine in parentheses; the estimate is a ratio, so its "
             "values can pass 1). "
             f"Measured: the mean cosine of independent batches ({sizes}), each through "
             "`halforder.estimators.estimate` with prompts and noise drawn as the training loop draws them "
             f"(REINFORCE: B/{cfg.group} prompts, {cfg.group} samples each, leave-one-out advantage in each group; "
             "full backprop: B independent prompts), with a full-backprop reference gradient, ± one standard "
             "error. Formula on the batches: mean <g_B, m_ref> / (|m| RMS |g_B|), the prediction's formula on the "
             "measured batches (± a bootstrap standard error).", "",
             "| preset | estimator | B | predicted cos(B) [95%] (replicates with a cosine) | limit | formula on the "
             "batches | measured mean cos(B) | ÷ reference's cosine | RMS / median norm |",
             "|---|---|---:|---|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['estimator']} | {r['B']} | {r['predicted']:.3f} [{r['interval'][0]:.3f}, "
                     f"{r['interval'][1]:.3f}] ({r['resolved']:.0%}) | {r['limit']:.3f} | {r['formula']:.3f} ± "
                     f"{r['formula_se']:.3f} | {r['measured']:.3f} ± {r['measured_se']:.3f} | {r['corrected']:.3f} | "
                     f"{r['norm_tail']:.2f} |")
    lines += ["", "## The reference gradients", ""]
    for preset, ref in refs.items():
        lines.append(f"- {preset}: full backprop over {ref['samples']:,} samples (chunks of {cfg.chunk}); "
                     f"|m|^2 = {ref['signal']:.4g} (without the noise), its squared error {ref['error']:.3g}: a "
                     f"relative error of {math.sqrt(ref['error'] / ref['signal']):.3f} and a cosine with the true "
                     f"gradient of about {ref['cosine']:.4f}, which lowers every measured cosine by that factor (to "
                     "first order) and leaves the formula's values unbiased.")
    spent_p = sum(r["pilot_spent"] for r in rows if r["B"] == cfg.batches[0][0])
    spent_m = sum(r["spent"] for r in rows)
    lines += ["", "## Compute", "",
              f"Counted evaluations: pilots {spent_p:,}, measured batches {spent_m:,}, references "
              f"{sum(r['spent'] for r in refs.values()):,}. Wall time {wall:.0f} s on one thread."]
    (out / "diagnose_tiny.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    """Run the validation (module docstring), write its outputs and return its numbers."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test (writes to runs/)")
    p.add_argument("--out", help="output folder (default docs/results; with --quick, runs/diagnose-tiny-quick)")
    args = p.parse_args(argv)
    out = Path(args.out or (REPO / "runs" / "diagnose-tiny-quick" if args.quick else REPO / "docs" / "results"))
    cfg = QUICK_CFG if args.quick else TinyConfig()
    torch.set_num_threads(int(os.environ.get("HALFORDER_THREADS", "1")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rows, refs = [], {}
    for preset in cfg.presets:
        for estimator in cfg.estimators:
            reinforce = estimator == "reinforce"
            run, _ = build(preset, estimator, cfg.group if reinforce else None)
            if preset not in refs:
                refs[preset] = reference(run, cfg)
            predicted, pilot = predict(run, estimator, cfg)
            for B, count in cfg.batches:
                draw, rng = draws(B, cfg.group if reinforce else None, cfg.seed + 1000 + B)
                X, spent = batch_estimates(run, draw, rng, count, reinforce)
                rows.append({"preset": preset, "estimator": estimator, "B": B, **predicted[B],
                             "pilot_rows": pilot["rows"], "pilot_spent": pilot["spent"],
                             "pilot_budget": pilot["budget"], **compare(X, refs[preset], cfg.seed + 1000 + B),
                             "spent": spent})
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write(out, cfg, rows, refs, wall)
    return {"config": dataclasses.asdict(cfg), "rows": rows,
            "references": {k: {n: v for n, v in r.items() if n != "m"} for k, r in refs.items()}, "wall_seconds": wall}


if __name__ == "__main__":
    main(sys.argv[1:])
