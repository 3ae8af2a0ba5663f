"""`halforder plan` and `halforder train --estimator auto`: bad budgets end with exit status 2
and a one-line message; an auto run trains the searched plan and records the choice."""
import importlib
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.cli import main  # noqa: E402
from halforder.planning.units import parse_bytes, parse_seconds  # noqa: E402



def test_sizes_and_durations_parse():
    assert parse_bytes("2GiB") == 2 * 2 ** 30 and parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    assert parse_seconds("1s") == 1.0 and parse_seconds("250ms") == 0.25 and parse_seconds("2min") == 120.0


@pytest.mark.parametrize("argv, message", [
    (["plan", "--preset", "tiny", "--memory", "2XB"], "not a size: '2XB'"),
    (["plan", "--preset", "tiny", "--memory", "0GiB"], "a size must be > 0"),
    (["plan", "--preset", "tiny", "--memory", "2GiB", "--time", "fast"], "not a duration: 'fast'"),
    (["train", "--preset", "tiny", "--estimator", "auto"], "estimator auto needs a memory budget"),
    (["train", "--preset", "tiny", "--estimator", "auto", "--memory-budget", "lots"], "not a size: 'lots'"),
    (["plan", "--preset", "tiny", "--memory", "1KiB"], "no plan fits in 1 KiB: the least memory any plan needs is "),
])
def test_bad_budgets_exit_2_with_one_line(tmp_path, capsys, argv, message):
    os.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


AUTO = ["train", "--preset", "tiny", "--T", "2", "--estimator", "auto", "--memory-budget", "64MiB",
        "--plan-pilots", "4", "--no-progress", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """One update of ``halforder train --estimator auto`` (T = 2, 64 MiB, a checkpoint after
    it), shared by the test of what it records and the test of its resume: its folder."""
    out = tmp_path_factory.mktemp("auto") / "auto"
    assert main([*AUTO, "--steps", "1", "--output-dir", str(out)]) == 0
    return out


def test_auto_trains_the_searched_plan_and_records_it(auto_run):
    out = auto_run
    rec = next(r for r in map(json.loads, open(out / "metrics.jsonl")) if "reward_mean" in r)
    assert rec["plan"].startswith("auto: ")
    table = (out / "plan_search.txt").read_text()
    chosen = rec["plan"][len("auto: "):]
    assert f"chosen: {chosen}: lowest variance x time" in table and "   1  " + chosen in table
    cfg = json.load(open(out / "config.json"))
    assert cfg["estimator"] == "auto" and cfg["memory_budget"] == "64MiB"
    # what the search spent, counted by the compute meter, before the first update
    first = json.loads(open(out / "metrics.jsonl").readline())
    cost = first["plan_search"]
    assert first["step"] == 0 and cost["evaluations"] == cost["evaluations_forward"] + cost["evaluations_backward"] > 0
    assert cost["seconds"] > 0 and cost["share_of_run"] == pytest.approx(cost["evaluations"] / cost["run_evaluations"])
    assert f"search cost: {cost['evaluations']:,} model evaluations ({cost['evaluations_forward']:,} forward" in table
    assert cost["chain_evaluations"] == cost["evaluations_forward"] / 2 <= cost["chain_evaluation_budget"] == 1000
    assert "chain evaluations of its budget of 1,000" in table


def test_the_search_cost_is_what_the_meter_counts(monkeypatch):
    """The reported forward count is the sum of every denoiser call's samples during the search
    (the meter's count, which a tally of the calls repeats), not a formula; the run it is
    compared with is the chosen plan's exact cost over the configured updates."""
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import prepare
    from halforder.estimators import compute, expected_evaluations

    real, calls = compute.record, []

    def tally(n, output):
        calls.append(n)
        real(n, output)
    monkeypatch.setattr("halforder.diffusion.sampling.denoiser.record", tally)
    cfg = load_config(None, dict(T=2, steps=3, grad_accum=2, estimator="auto", memory_budget="64MiB",
                                 plan_pilots=4, output_dir=None, progress=False), preset="tiny")
    prepared = prepare(cfg)
    cost = prepared.search.cost
    assert cost.forward == sum(calls) > 0 and cost.backward > 0
    want = expected_evaluations(prepared.sampler.plan, cfg.batch_size, prepared.task.gradient_checkpointing)
    assert cost.run_evaluations == cfg.steps * cfg.grad_accum * (want["forward"] + want["backward"])


def test_runnable_with_checkpointing_keeps_plans_whose_steps_checkpointing_cannot_change():
    """With --gradient-checkpointing a run checkpoints every step; an FO prefix of one step
    or HO blocks of one step are the same checkpointed or not, so RLR with K = 1, h = 1
    tilings (REINFORCE) and ZO plans stay candidates; elsewhere only the all-checkpointed
    variant does."""
    from types import SimpleNamespace

    from halforder.diffusion.app.plan_choice import space_for
    from halforder.estimators import Plan
    from halforder.planning.space import Candidate, checkpointable
    T = 6
    kept = space_for(SimpleNamespace(pairing="auto", gradient_checkpointing=True)).candidates(T)
    assert Candidate(Plan.reinforce(T)) in kept
    assert Candidate(Plan.zeroth_order(T), "param") in kept
    assert any(c.plan.fo_steps == 1 for c in kept)
    assert Candidate(Plan.full(T), "none", ("FO",)) in kept and Candidate(Plan.full(T)) not in kept
    assert all(set(c.checkpoint) == set(checkpointable(c.plan.fo_steps, c.plan.blocks)) for c in kept)
    plain = space_for(SimpleNamespace(pairing="auto", gradient_checkpointing=False)).candidates(T)
    assert set(kept) <= set(plain) and Candidate(Plan.full(T)) in plain
    assert Candidate(Plan.from_roles(["FO"] * 4 + ["HO"] * 2, [(5, 2)]), "none", ("FO",)) not in plain


def test_plan_takes_an_ordinary_rlr_config(tmp_path, capsys):
    """`halforder plan --config run.yaml` on an RLR run's config (fixed j, h) ranks the plans:
    the config's estimator settings are replaced by the search, not refused."""
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nT: 2\nestimator: rlr\nh: 1\nj_sampling: fixed\nj: 2\n")
    os.chdir(tmp_path)
    assert main(["plan", "--config", str(path), "--memory", "64MiB", "--plan-pilots", "4", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "chosen: " in out and "lowest variance x time" in out
    # the search of this short run (6 updates) costs more than the run, and the last line says why
    assert "times the" in out.splitlines()[-1] and "1,000 chain evaluations, however short the run" in out
    assert os.listdir(tmp_path) == ["run.yaml"]


def test_a_resumed_auto_run_trains_the_plan_it_chose_without_searching(tmp_path, capsys, monkeypatch, auto_run):
    """The choice is stored in the run (plan.json); a resume reuses it and does not search
    again (a timing-dependent search could switch the estimator mid-run); without it the
    resume is refused with one line. The run resumed is a copy of :func:`auto_run`."""
    import halforder.diffusion.app.plan_choice as planning
    out = tmp_path / "auto"
    shutil.copytree(auto_run, out)
    args = [*AUTO, "--output-dir", str(out)]
    chosen = json.load(open(out / "plan.json"))
    table = (out / "plan_search.txt").read_text()
    monkeypatch.setattr(planning, "measure", lambda *a, **k: pytest.fail("searched again on resume"))
    assert main([*args, "--steps", "2", "--resume", "latest"]) == 0
    plans = [r["plan"] for r in map(json.loads, open(out / "metrics.jsonl")) if "plan" in r]
    assert len(plans) == 2 and set(plans) == {chosen["name"]}
    assert (out / "plan_search.txt").read_text() == table
    capsys.readouterr()
    os.remove(out / "plan.json")
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "without the plan it chose" in err and len(err.strip().splitlines()) == 1


def test_out_of_memory_in_the_search_is_one_line(tmp_path, capsys, monkeypatch):
    import halforder.diffusion.app.plan_choice as planning

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    monkeypatch.setattr(planning, "measure", oom)
    os.chdir(tmp_path)
    assert main(["plan", "--preset", "tiny", "--memory", "8GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("halforder plan: error: the device ran out of memory") and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_the_search_at_T50_on_tiny_sd_stays_under_its_evaluation_budget(monkeypatch):
    """`halforder plan --preset tiny` at T = 50 in the default space: the search's chain
    evaluations (forward model evaluations / T, counted by the compute meter) stay under the
    budget it is given, and the budget is what stops it (some HO parts are left "not
    piloted: budget"). The default search (1,000 chain evaluations, 64 pilot rows) takes
    758 of them where every plan fits and 999 under 2.7 MiB, in 6 to 7 minutes on one core
    here (docs/results/e8_search_cost_T50.md). To fit the suite's time the test gives it 16
    pilot rows and a budget of 110, just above what the memory measurement, the timing
    probes and the shared pilot then take (about 100): the same rule, binding sooner."""
    from halforder.diffusion.app import plan_choice
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import prepare

    monkeypatch.setattr(plan_choice, "SEARCH_EVALUATIONS", 110)
    cfg = load_config(None, dict(T=50, estimator="auto", memory_budget="1GiB", output_dir=None, progress=False,
                                 plan_pilots=16), preset="tiny")
    assert plan_choice.evaluation_budget(cfg) == 110
    result = prepare(cfg).search
    assert result.cost.forward / 50 <= 110
    notes = [s.note for s in result.measured.scored]
    assert "budget" in notes and notes.count("") > 0
    assert result.best.candidate.plan.fo_steps == 50     # full backprop wins by orders of magnitude here


def _never(*args, **kwargs):
    raise AssertionError("the search timed probes or ran pilots")


@pytest.mark.parametrize("argv", [
    ["plan", "--preset", "tiny", "--memory", "1KiB"],
    ["train", "--preset", "tiny", "--estimator", "auto", "--memory-budget", "1KiB", "--no-progress"],
])
def test_no_plan_within_the_memory_is_answered_before_any_timing_or_pilot(tmp_path, capsys, monkeypatch, argv):
    """From the memory model alone: exit status 2 and one line once the memory is measured,
    with no timing probe and no pilot."""
    stages = importlib.import_module("halforder.planning.stages")
    monkeypatch.setattr(stages, "fit_time_model", _never)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no plan fits in 1 KiB: the least memory any plan needs is" in err
    assert not os.listdir(tmp_path)


def test_no_plan_within_the_time_budget_is_answered_before_any_pilot(tmp_path, capsys, monkeypatch):
    stages = importlib.import_module("halforder.planning.stages")

    for pilot in ("measure_step_gradients", "measure_part_variances", "pilot_ho_parts"):
        monkeypatch.setattr(stages, pilot, _never)
    (tmp_path / "run.yaml").write_text("preset: tiny\nT: 2\nh: 1\n")    # fewer steps: quicker timing probes
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--config", "run.yaml", "--memory", "2GiB", "--time", "1us"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "no plan fits in 2 GiB and 1e-06 s per estimate: the fastest that fits the memory takes " in err
    assert os.listdir(tmp_path) == ["run.yaml"]
