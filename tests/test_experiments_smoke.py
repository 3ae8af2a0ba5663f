"""Smoke test: every experiment runs end to end in --quick mode, as the README runs it, and
writes its outputs without changing a tracked file, nor the run that the README's tiny
training command leaves in runs/tiny/.

--quick uses tiny sample sizes, so only structural facts are asserted here, plus the
deterministic ones (the exact truncation bias, the solver's h*); the statistical results
live in docs/results/ and are produced by the full run.
"""
import csv
import os

import pytest

from halforder.training.checkpoints import latest_checkpoint

STEMS = ["e1_unbiasedness", "e2_variance", "e2_prop62_cosine", "e3_truncation", "e4_hstar", "e4_variance_by_h",
         "e5_convergence", "e6_compute", "e7_pairing", "e7_pairing_cosine", "e7_pairing_tau", "e8_plan_search", "e8_plan_search_candidates",
         "e8_model_error", "e8_search_cost", "e8_search_cost_T50", "e9_field_kl"]
FIGURES = ["e1_unbiasedness", "e2_variance", "e3_truncation", "e4_hstar", "e5_convergence", "e6_compute", "e7_pairing",
           "e8_plan_search", "e9_field_estimators"]


CLONE_COMMANDS = [TINY, RUN_ALL_QUICK] = ["halforder train --preset tiny --output-dir runs/tiny",
                                         "python -m experiments.run_all --quick"]


@pytest.fixture(scope="module")
def tiny_run(clone, run_in_clone):
    """The run that the README's ``halforder train --preset tiny --output-dir runs/tiny``
    leaves in runs/tiny/, the folder of the tiny preset (a checkpoint and a config.json), and
    when that command ended (``time.time()``)."""
    proc = run_in_clone(TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = clone / "runs" / "tiny"
    assert latest_checkpoint(str(run / "checkpoints")) is not None and (run / "config.json").is_file()
    return run, proc.finished


@pytest.fixture(scope="module")
def quick_out(clone, run_in_clone, tiny_run):
    """The README's ``python -m experiments.run_all --quick``, run as written in the clone
    after the README's tiny run filled runs/tiny/ (it writes runs/quick-results/, never docs/,
    and leaves that run alone): its output folder, after checking that git status stays clean
    and nothing in runs/tiny/ was written after the tiny run's own command ended."""
    proc = run_in_clone(RUN_ALL_QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, finished = tiny_run
    assert proc.status == "" and all(p.stat().st_mtime <= finished for p in run.rglob("*"))
    return clone / "runs" / "quick-results"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_output_is_written(quick_out):
    for stem in STEMS:
        assert (quick_out / f"{stem}.csv").stat().st_size > 0
        md = (quick_out / f"{stem}.md").read_text()
        assert md.count("\n|") >= 3  # header, rule and at least one row
    for stem in FIGURES:
        assert (quick_out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_tables_are_consistent(quick_out):
    # e1: the biased control (truncated K=1, relative bias 0.85 here) is rejected even at n = 2048
    e1 = {r["estimator"]: r for r in _rows(quick_out / "e1_unbiasedness.csv")}
    assert e1["truncated K=1"]["unbiased plan"] == "no" and e1["truncated K=1"]["verdict"] == "REJECT"
    assert e1["full backprop (FO)"]["unbiased plan"] == "yes"
    # e3: the exact bias vanishes at K = T and decreases along the measured K
    e3 = _rows(quick_out / "e3_truncation.csv")
    exact = [float(r["|bias| exact"]) for r in e3]
    assert exact[-1] == 0.0 and all(b < a for a, b in zip(exact, exact[1:]))
    # e7: every plan with every pairing; G is the group size of the pairing
    e7 = _rows(quick_out / "e7_pairing.csv")
    sizes = {"none": 1, "param": 2, "ho": 2, "param+ho": 4}
    assert len(e7) == 5 * len(sizes) and {r["pairing"] for r in e7} == set(sizes)
    assert all(int(r["G"]) == sizes[r["pairing"]] for r in e7)
    # e8: every budget judged, and the search's memory model exact on the toy chain
    e8 = _rows(quick_out / "e8_plan_search.csv")
    assert {r["chain"] for r in e8} == {"toy", "tiny SD"} and all(float(r["top / best (measured var x time)"]) >= 1
                                                                  for r in e8)
    err = {r["chain"]: r for r in _rows(quick_out / "e8_model_error.csv")}
    assert float(err["toy"]["memory: max relative error"]) == 0.0
    # e8: both search variants counted on both chains, the shared pilot and pruning cheaper than one pilot a part
    cost = {(r["chain"], r["variant"]): float(r["chain evaluations"]) for r in _rows(quick_out / "e8_search_cost.csv")}
    assert all(cost[(c, "shared + bound")] < cost[(c, "exhaustive")] for c in ("toy", "tiny SD"))
    t50 = _rows(quick_out / "e8_search_cost_T50.csv")
    assert len(t50) == 2 and all(float(r["chain evaluations"]) > 0 for r in t50)
    # e4: the solver's h* is the largest affordable h and never exceeds it
    for r in _rows(quick_out / "e4_hstar.csv"):
        assert int(r["solver h*"]) == int(r["largest feasible h"])


def test_diagnose_cpu_quick(tmp_path, monkeypatch):
    """experiments/diagnose_cpu.py --quick (a tiny model, a few seconds) writes its table, csv and
    figure: a prediction, a measurement and a formula value for every method diagnose covers,
    and the methods it does not cover listed as such."""
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import diagnose_cpu

    out = tmp_path / "out"
    summary = diagnose_cpu.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert set(summary["rows"]) == set(diagnose_cpu.COVERED)
    for r in summary["rows"].values():
        assert r["pilot_spent"] <= r["pilot_budget"] and r["batches"] == diagnose_cpu.QUICK_CFG.batches
        assert -1 <= r["measured"] <= 1 and r["spent"] > 0
    assert {"zeroth_order", "rlr_h2", "rlr_h2_noZO"} <= set(summary["not_covered"])
    assert summary["spearman"]["n"] == len(diagnose_cpu.COVERED)
    assert len(_rows(out / "diagnose_cpu.csv")) == len(diagnose_cpu.COVERED)
    assert "## Not covered" in (out / "diagnose_cpu.md").read_text()
    assert (out / "diagnose_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_field_estimators(quick_out):
    """e9 --quick: every chain, the recipes' command lines, counts and exact figures that do not
    depend on the sample size."""
    rows = _rows(quick_out / "e9_field_estimators.csv")
    assert (quick_out / "e9_field_estimators.md").read_text().count("\n## ") >= 4
    by = {(r["chain"], r["estimator"]): r for r in rows}
    assert {r["chain"] for r in rows} == {"linear", "tanh", "tiny SD3"}
    # DRaFT-1 costs T forward evaluations and one backward per sample, counted by the meter
    assert float(by[("linear", "DRaFT-1")]["evals/sample"]) == 9
    assert float(by[("tiny SD3", "DRaFT-1")]["evals/sample"]) == 5
    assert by[("linear", "DRaFT-1")]["flags"] == "--estimator truncated --k 1"
    assert by[("linear", "Flow-GRPO, 2nd update")]["flags"] == (
        "--estimator reinforce --reinforce-window 2 8 --baseline grpo --group-size 24 --global-std "
        "--clip-range 0.0001 --updates-per-rollout 2 --kl-beta 0.04")
    # the plan laws' unbiasedness as the samplers state it; intervals that hold their estimate
    full = by[("linear", "halforder: full backprop")]
    assert full["plan law unbiased"] == "True" and by[("linear", "DRaFT-1")]["plan law unbiased"] == "False"
    for r in rows:
        lo, b, hi = float(r["bias lo"]), float(r["bias"]), float(r["bias hi"])
        assert 0 <= lo <= b <= hi and -1 <= float(r["cos"]) <= 1 and float(r["var/sample"]) >= 0
        assert r["clip fraction"] == "" or 0 <= float(r["clip fraction"]) <= 1
    # the field's KL gradient misses part of the path KL's, exactly (no sampling)
    kl = _rows(quick_out / "e9_field_kl.csv")
    assert abs(float(kl[0]["direct part: relative error"]) - 0.0336) < 1e-3


def test_diagnose_tiny_quick(tmp_path, monkeypatch):
    """experiments/diagnose_tiny.py --quick (the tiny presets, small sizes, a few seconds) writes
    its table and csv: a prediction, a measurement and a formula value for every preset,
    estimator and batch size, each pilot within its budget."""
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import diagnose_tiny

    cfg = diagnose_tiny.QUICK_CFG
    out = tmp_path / "out"
    summary = diagnose_tiny.main(["--quick", "--out", str(out)])
    assert len(summary["rows"]) == len(cfg.presets) * len(cfg.estimators) * len(cfg.batches)
    for r in summary["rows"]:
        assert r["pilot_spent"] <= r["pilot_budget"] and r["batches"] == dict(cfg.batches)[r["B"]]
        assert -1 <= r["measured"] <= 1 and r["spent"] > 0
    assert set(summary["references"]) == set(cfg.presets)
    assert len(_rows(out / "diagnose_tiny.csv")) == len(summary["rows"])
    assert "## The reference gradients" in (out / "diagnose_tiny.md").read_text()
