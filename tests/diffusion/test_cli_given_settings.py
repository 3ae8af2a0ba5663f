"""`halforder train` judges the settings a user gave: a preset's (or a run's config.json's)
value that a flag makes unused gives way to its default, while a user's own setting without
effect is refused; every reward's options are checked against its factory's signature before
anything is built, and a wrong value ends the command with one line (exit 2)."""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app import cli, run  # noqa: E402
from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.diffusion.app.config import PRESETS, TrainConfig, load_config  # noqa: E402
from halforder.diffusion.rewards import REWARDS  # noqa: E402


@pytest.fixture
def trained(monkeypatch):
    """The settings `halforder train` would train with: ``prepare`` and ``run`` record the config
    instead of building the model (nothing is downloaded, nothing trains)."""
    seen = []
    monkeypatch.setattr(run, "prepare", lambda cfg, device: seen.append(cfg))
    monkeypatch.setattr(run, "run", lambda cfg, prepared, acc: type("Result", (), {"metrics": [], "step": 0}))
    return seen


def _fails(tmp_path, capsys, args, *matches):
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: ") and err.count("\n") == 1, err
    assert all(m in err for m in matches), err
    assert not out.exists()
    return err


def test_flow_grpos_eta_on_a_flow_preset_trains(tmp_path, capsys):
    """docs/flow.md's `--eta 0.7` on tiny-flux: the preset's eta_plan gives way; the run trains."""
    out = tmp_path / "flux"
    assert main(["--preset", "tiny-flux", "--eta", "0.7", "--steps", "1", "--eval-every", "0", "--output-dir",
                 str(out), "--no-progress"]) == 0
    config = json.load(open(out / "config.json"))
    assert (config["eta"], config["eta_plan"]) == ("0.7", 0.1)


@pytest.mark.parametrize("args", [["--preset", "sd35m", "--eta", "0.7"], ["--preset", "tiny-video", "--eta", "1"],
                                  ["--preset", "tiny-flux", "--estimator", "reinforce", "--eta", "0.7"]])
def test_a_presets_value_that_a_flag_makes_unused_gives_way(tmp_path, trained, args):
    assert main([*args, "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert PRESETS[args[1]]["eta_plan"] != 0.1 and trained[0].eta_plan == 0.1


def test_a_users_own_setting_without_effect_is_still_refused(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--preset", "tiny-flux", "--eta", "0.7", "--eta-plan", "0.5"],
           "eta_plan=0.5 has no effect here: it applies only with eta 'plan'")
    own = tmp_path / "own.yaml"
    own.write_text("ema: false\nema_decay: 0.9\n")
    _fails(tmp_path, capsys, ["--config", str(own)], "ema_decay=0.9 has no effect here: it applies only with ema")


def test_a_runs_config_json_with_no_ema(tmp_path, trained):
    """A run's config.json holds every setting; --no-ema on it drops its ema_decay."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(load_config(None, {"preset": "tiny", "ema": True, "ema_decay": 0.9}).to_dict()))
    assert main(["--config", str(path), "--no-ema", "--output-dir", str(tmp_path / "new")]) == 0
    assert (trained[0].ema, trained[0].ema_decay) == (False, 0.99)
    assert trained[0].preset == "tiny" and trained[0].T == 6


@pytest.mark.parametrize("args,matches", [
    (["--reward-kwargs", '{"foo": 1}'], ["reward 'brightness' has no option 'foo'; its options: target"]),
    (["--eval-rewards", '{"brightness": {"foo": 1}}'], ["reward 'brightness' has no option 'foo'"]),
    (["--eval-rewards", '{"brightness": 1}'], ["options of reward 'brightness' must be a mapping"]),
    (["--reward", "clipscore", "--reward-kwargs", '{"modle": "/models/clip"}'],
     ["reward 'clipscore' has no option 'modle'; its options: model,"]),
    (["--preset", "tiny-video", "--reward-kwargs", '{"tempral": {"features": "pixels"}}'],
     ["reward 'brightness+0.5*temporal' is a sum", "a term of brightness, temporal; got 'tempral'"]),
    (["--preset", "tiny-video", "--reward-kwargs", '{"temporal": {"modle": "/models/clip"}}'],
     ["reward 'temporal' has no option 'modle'; its options: features, seed, model"]),
    (["--reward", "color", "--reward-kwargs", '{"target": "green"}'], ["color target must be 3 numbers (RGB"]),
    (["--reward-kwargs", '{"target": "bright"}'], ["brightness target must be a number, got 'bright'"]),
    (["--reward", "random_cnn", "--reward-kwargs", '{"seed": "one"}'], ["random_cnn seed must be an integer"]),
])
def test_reward_options_end_the_command_in_one_line(tmp_path, capsys, args, matches):
    _fails(tmp_path, capsys, args, *matches)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_rewards_options_are_read_from_its_signature(name):
    """An option a reward does not take is refused before the reward is built, naming those it takes."""
    import inspect

    params = inspect.signature(REWARDS[name]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        pytest.skip(f"{name} takes any option")
    with pytest.raises(ValueError, match=rf"^reward '{name}' has no option 'nope'; its options: ") as e:
        TrainConfig(reward=name, reward_kwargs={"nope": 1}, estimator="reinforce")   # reinforce: any reward
    assert str(e.value).endswith(", ".join(params) or "none")
