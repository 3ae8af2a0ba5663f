"""`halforder diagnose` as a user types it: on a tiny preset it stays within its budget,
counted by the meter, prints what it spent and writes diagnosis.md (with plots) and
diagnosis.json; bad input exits 2 with one line and writes nothing."""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.cli import main  # noqa: E402


def test_diagnose_a_reinforce_run_with_groups(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--preset", "tiny", "--estimator", "reinforce", "--group-size", "4", "--budget", "3000",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "of a budget of 3,000 evaluations" in text
    d = json.load(open(out / "diagnosis.json"))
    assert d["spent"] <= d["budget"] == 3000 and d["kind"] == "likelihood ratio"
    resolved = d["suggestion"] is not None
    assert len(d["steps"]) == 6 and resolved is ("does not resolve the gradient" not in text)
    assert not resolved or abs(sum(s["share"] for s in d["steps"]) - 1) < 1e-9
    assert {c["group"] for c in d["curves"]} == {2, 4, 8}
    assert set(d["ratio"]) == {"float32", "bf16"}
    assert all(r["same batch"]["log_ratio"] == 0.0 for r in d["ratio"]["float32"])
    md = (out / "diagnosis.md").read_text()
    assert "## Which steps carry the gradient" in md and "![cosine against batch size](batch.png)" in md
    assert (out / "steps.png").stat().st_size > 0 and (out / "batch.png").stat().st_size > 0


def test_diagnose_a_backprop_run_finds_the_steps_that_carry_the_gradient(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--preset", "tiny", "--estimator", "truncated", "--k", "2", "--budget", "1200",
                 "--out", str(out)]) == 0
    d = json.load(open(out / "diagnosis.json"))
    assert d["kind"] == "pathwise" and d["spent"] <= 1200 and d["pilot"]["rows"] >= 24
    assert abs(sum(s["share"] for s in d["steps"]) - 1) < 1e-9 and d["suggestion"]["steps"]
    assert [c["estimator"] for c in d["curves"]] == ["full backprop", "the run's: truncated(k=2)"]
    assert "smallest batch for cos >= 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--estimator", "reinforce", "--budget", "50"], "too small for the pilot"),
    (["--estimator", "reinforce"], "(the default is 2% of the run's evaluations: pass --budget N)"),
    (["--estimator", "zeroth_order", "--budget", "5000"], "use halforder plan"),
    (["--estimator", "full", "--reward", "ocr", "--budget", "5000"], "has no gradient"),
    (["--estimator", "reinforce", "--target", "1.5"], "--target must lie in (0, 1)"),
    (["--estimator", "bogus"], "argument --estimator: invalid choice: 'bogus'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "diag"
    assert main(["diagnose", "--preset", "tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if not line.startswith("halforder diagnose: pilot")][-1].startswith(
        "halforder diagnose: error: ")
    assert match in err[-1], err
    assert sum(line.startswith("halforder diagnose: error") for line in err) == 1
    assert not out.exists()
