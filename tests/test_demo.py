"""``halforder demo``: a verdict only where the test can be made, clean errors for settings
that cannot work."""
import pytest

from halforder.cli import main


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| plan")]


def test_too_few_samples_are_said_as_such(capsys):
    # d = 3: 12 gradient coordinates, so 10 samples leave the sample covariance singular
    assert main(["demo", "--samples", "10"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 7
    assert all("| too few samples to test |" in r for r in rows)
    assert "| biased" not in out
    assert "more samples than the 12 gradient coordinates" in out


def test_enough_samples_give_verdicts(capsys):
    # 13 samples > 12 coordinates: every row is tested (seeded, so the verdicts are fixed)
    assert main(["demo", "--samples", "13"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 7
    verdicts = ("| consistent |", "| biased, as expected |", "| biased: unexpected |", "| bias not detected at this n |")
    assert all(any(v in r for v in verdicts) for r in rows)


def test_the_biased_plan_is_labelled_the_expected_negative_control(capsys):
    """The default demo's truncated row is biased by design; it says so, and no unbiased plan is
    called biased."""
    assert main(["demo", "--samples", "5000"]) == 0
    out = capsys.readouterr().out
    truncated = [r for r in _rows(out) if r.startswith("| truncated")]
    assert len(truncated) == 1 and "| False |" in truncated[0] and "| biased, as expected |" in truncated[0]
    assert "| biased: unexpected |" not in out
    assert "negative control" in out


@pytest.mark.parametrize("argv, message", [
    (["--samples", "1"], "samples must be at least 2"),
    (["--samples", "0"], "samples must be at least 2"),
    (["--d", "0"], "d (the chain's dimension) must be at least 1"),
    (["--T", "5"], "T must be at least 6"),
])
def test_impossible_settings_exit_2_with_one_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert err.out == ""
    assert f"halforder demo: error: {message}" in err.err
    assert "Traceback" not in err.err
