"""The field's recipes from the command line: Flow-GRPO's on the tiny SD3 preset completes and
logs the ratio, the clip fraction and the KL; bad settings exit 2 with one line."""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.cli import main  # noqa: E402

FLOW_GRPO = ["--estimator", "reinforce", "--group-size", "4", "--step-fraction", "0.5", "--clip-range", "1e-4",
             "--updates-per-rollout", "2", "--kl-beta", "0.01"]


def test_the_flow_grpo_recipe_runs_on_tiny_sd3(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "tiny-sd3", *FLOW_GRPO, "--steps", "2", "--eval-every", "0", "--output-dir", str(out),
                 "--no-progress"]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in recs if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["updates"] == 2 and "fraction 0.5, weighted" in r["plan"]
        assert 0 <= r["clip_fraction"] <= 1 and r["ratio_mean"] > 0 and r["kl"] >= 0
        assert r["evaluations_backward"] > 0
    assert train[-1]["kl"] > 0          # the second rollout is sampled by moved weights
    assert json.load(open(out / "config.json"))["group_size"] == 4


@pytest.mark.parametrize("args,match", [
    (["--estimator", "reinforce", "--group-size", "3"], "group_size must divide batch_size=4"),
    (["--estimator", "reinforce", "--step-fraction", "0"], "step fraction must lie in (0, 1]"),
    (["--estimator", "reinforce", "--step-fraction", "1.5"], "step fraction must lie in (0, 1]"),
    (["--estimator", "reinforce", "--clip-range", "0"], "clip_range must be > 0"),
    (["--estimator", "reinforce", "--clip-range=-1e-4"], "clip_range must be > 0"),
    (["--estimator", "reinforce", "--updates-per-rollout", "0"], "updates_per_rollout must be an integer >= 1"),
    (["--estimator", "full", "--updates-per-rollout", "2"], "use estimator reinforce"),
    (["--estimator", "rlr", "--clip-range", "0.2"], "use estimator reinforce"),
    (["--estimator", "reinforce", "--kl-beta=-1"], "kl_beta must be >= 0"),
    (["--estimator", "reinforce", "--step-fraction", "0.5", "--window-length", "2"], "give one"),
    (["--estimator", "full", "--step-fraction", "0.5"], "step_fraction=0.5 has no effect here"),
    (["--estimator", "reinforce", "--window-position", "sliding"], "window_position='sliding' has no effect here"),
    (["--global-std"], "global_std=True has no effect here"),
])
def test_bad_field_settings_exit_2_with_one_line(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not out.exists()
