"""Experiment 8, part (c): what the default plan search (``halforder plan --preset tiny`` at
T = 50) spends, run and metered, against the exhaustive search's pilots for the same parts,
counted from the pilot plans' exact costs; extrapolated to SD 1.4 on an H100 per model
evaluation. Run by :mod:`experiments.e8_plan_search`."""
from __future__ import annotations

from dataclasses import replace

from halforder.estimators import Pairing, Role, expected_evaluations
from halforder.planning.part_variances import fo_pilot, ho_pilot, zo_pilot

from .common import write_table

# Seconds per model evaluation of one sample at SD 1.4 size on an H100 (docs/results/sd_scale_h100_reference.md:
# batch 2, CFG, T = 50): a no-grad rollout, 4.20 s / (2 x 50) forward; checkpointed full backprop, 14.09 s, is a
# forward, a recomputation and a backward per sample and step: (14.09 / 100 - 2 x 0.042) backward.
SD14_FORWARD, SD14_BACKWARD = 0.042, 14.09 / 100 - 2 * 0.042


def exhaustive_pilots(measured, T: int, n: int, rows: int, baseline) -> tuple[int, int]:
    """The model evaluations (forward, backward) of the exhaustive search's pilots for the
    parts ``measured`` needs (one per FO prefix, HO layout and ZO layout, ``rows`` rows
    each, drawn as :func:`~halforder.planning.part_variances.variance_rows` draws them),
    counted from the pilot plans' exact costs (the meter equals them, tests/test_compute.py):
    the old search at T = 50 takes hours on this machine and is counted, not run."""
    fo = bw = 0

    def add(plan, groups_per_batch, G, base):
        nonlocal fo, bw
        samples = (max(2, rows // groups_per_batch) * groups_per_batch if isinstance(base, str) else rows) * G
        e = expected_evaluations(plan, samples)
        fo, bw = fo + e["forward"], bw + e["backward"]

    cands = [s.candidate for s in measured.scored if s.note != "over the probe memory"]
    for K in sorted({c.plan.fo_steps for c in cands if c.plan.fo_steps}):
        add(fo_pilot(T, K), n, 1, None)
    for blocks, G in sorted({(tuple(sorted(c.plan.blocks)), Pairing.parse(c.pairing).size)
                             for c in cands if c.plan.blocks}):
        add(ho_pilot(T, blocks), n // G, 1, baseline)
    for K, blocks, p in sorted({(c.plan.fo_steps, tuple(sorted(c.plan.blocks)), Pairing.parse(c.pairing).name)
                                for c in cands if Role.ZO in c.plan.roles}):
        G = Pairing.parse(p).size
        add(zo_pilot(T, K, blocks), n // G, G, baseline)
    return fo, bw


def cost_part(quick: bool):
    """Part (c): what the default search (``halforder plan --preset tiny`` at T = 50, its
    default pilots) spends, under a budget where everything fits and under one where
    checkpointed full backprop does not, against the exhaustive search's pilots for the
    same parts, counted; extrapolated to SD 1.4 on an H100 per model evaluation."""
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import prepare

    T = 4 if quick else 50
    rows = []
    for budget in ("1GiB",) if quick else ("1GiB", "2.7MiB"):
        cfg = replace(load_config(None, dict(T=T, estimator="auto", memory_budget=budget, progress=False,
                                             **({"plan_pilots": 4} if quick else {})), preset="tiny"),
                      output_dir=None)   # writes nothing: a run in the preset's folder is left alone
        prepared = prepare(cfg)
        cost, spent = prepared.search.cost, prepared.search.measured.spent
        m = prepared.search.measured
        old_fw, old_bw = exhaustive_pilots(m, T, cfg.batch_size, cfg.plan_pilots, cfg.baseline)
        old_fw += spent.memory_and_timing[0]
        old_bw += spent.memory_and_timing[1]
        notes = [s.note for s in m.scored]
        for variant, fw, bw, secs in (("shared + bound (run)", cost.forward, cost.backward, cost.seconds),
                                      ("exhaustive (counted)", old_fw, old_bw, None)):
            rows.append([budget, variant, round(fw / T, 1), fw, bw, None if secs is None else round(secs, 1),
                         round((fw * SD14_FORWARD + bw * SD14_BACKWARD) / 3600, 2),
                         prepared.search.best.candidate.name if secs is not None else "—",
                         f"{notes.count('bound')} / {notes.count('halving')} / {notes.count('budget')}"
                         if secs is not None else "—"])
    return rows


def write_cost_t50(out, quick: bool = False) -> None:
    """Part (c) alone: writes ``e8_search_cost_T50`` to ``out``."""
    write_table(out, "e8_search_cost_T50", ["memory budget", "variant", "chain evaluations",
                                            "model evaluations forward", "backward", "seconds (this CPU)",
                                            "hours at SD 1.4 size on an H100 (extrapolated)", "chosen",
                                            "not piloted: bound / halving / budget"], cost_part(quick),
                "**The default search at T = 50** (`halforder plan --preset tiny` with T = 50: tiny SD, batch 4, "
                "64 pilot rows per part, leave-one-out baseline, pairing param), run and metered, against the "
                "exhaustive search's pilots for the same parts, counted from the pilot plans' exact costs (not run: "
                "hours here) plus the same memory and timing stage. The H100 hours multiply the model evaluations "
                f"by {SD14_FORWARD} s per forward and {SD14_BACKWARD:.3f} s per backward evaluation of one sample "
                "(SD 1.4 size, batch 2, CFG, from the H100 reference figures in docs/results/sd_scale_h100_reference.md).")
