"""`halforder train` on bad input: one line on stderr, exit status 2, nothing written (no output
directory, no config.json, no empty metrics.jsonl), and messages that say what is wrong."""
import dataclasses
import math
import os
import typing

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.diffusion.app.config import TrainConfig, load_config  # noqa: E402



def _fails(tmp_path, capsys, args, match, out=None):
    out = out or str(tmp_path / "out")
    assert main(["--preset", "tiny", "--output-dir", out, "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("args,match", [(["--lr", "inf"], "lr must hold finite numbers only, got inf"),
                                        (["--guidance-scale", "nan"], "guidance_scale must hold finite numbers"),
                                        (["--adam-betas", "0.9", "nan"], "adam_betas must hold finite numbers"),
                                        (["--eta", "inf"], "eta must be 'plan' or a finite number"),
                                        (["--reward-kwargs", '{"target": NaN}'], "reward_kwargs must hold finite")])
def test_non_finite_numbers_end_the_command_cleanly(tmp_path, capsys, args, match):
    _fails(tmp_path, capsys, args, match)


def _holds_float(tp) -> bool:
    return tp is float or any(map(_holds_float, typing.get_args(tp)))


FLOATS = [f.name for f in dataclasses.fields(TrainConfig) if _holds_float(typing.get_type_hints(TrainConfig)[f.name])]


def test_the_float_fields_are_found():
    assert {"lr", "guidance_scale", "zo_sigma", "adam_betas", "dcot_split", "fps"} <= set(FLOATS)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOATS)
def test_every_float_field_refuses_non_finite_numbers(name, bad):
    default = getattr(TrainConfig(), name)
    value = [bad, *default[1:]] if isinstance(default, list) else [bad, 0.5, 0.5] if name == "dcot_split" else bad
    extra = {"dcot": "dcot.yaml"} if name == "dcot_split" else {}
    with pytest.raises(ValueError, match=f"{name} must .*finite"):
        load_config(None, {**extra, name: value})


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _fails(tmp_path, capsys, [], "output directory", out=str(tmp_path / "file"))
    _fails(tmp_path, capsys, [], "cannot be created", out=str(tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "x"


def test_an_output_dir_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    real = os.access      # the check asks os.access (a read-only directory is writable to root)
    monkeypatch.setattr(os, "access", lambda p, m: False if os.fspath(p) == str(tmp_path) else real(p, m))
    _fails(tmp_path, capsys, [], "is not writable")


def test_nothing_to_resume(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--resume", "latest"], "nothing to resume")


def test_negative_h_is_called_negative(tmp_path, capsys):
    err = _fails(tmp_path, capsys, ["--h", "-1"], "h=-1 is negative")
    assert "too large" not in err


@pytest.mark.parametrize("args", [["--j-sampling", "fixed", "--j", "9"], ["--j-sampling", "fixed", "--j", "1"],
                                  ["--j-sampling", "window", "--j-window", "1", "5"]])
def test_j_is_called_the_start_of_the_block_not_a_step(tmp_path, capsys, args):
    err = _fails(tmp_path, capsys, args, "needs 2 <= j <= T-h+1 = 5 for the start j of its HO block")
    assert "step" not in err.replace("steps", ""), err


def test_j_sampling_fixed_without_j(tmp_path, capsys):
    err = _fails(tmp_path, capsys, ["--j-sampling", "fixed"], "got j=None")
    assert "step" not in err, err


@pytest.mark.parametrize("flag", ["--prompts", "--eval-prompts", "--dcot"])
def test_a_prompt_file_that_does_not_decode_is_named(tmp_path, capsys, flag):
    bad = tmp_path / ("latin1.yaml" if flag == "--dcot" else "latin1.txt")
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    _fails(tmp_path, capsys, [flag, str(bad)], repr(str(bad)))


@pytest.mark.parametrize("args,match", [
    (["--preset", "tiny-flux", "--negative-prompt", "blurry"], "negative_prompt has no effect"),
    (["--guidance-scale", "1", "--negative-prompt", "blurry"], "negative_prompt has no effect"),
    (["--preset", "tiny-wan", "--checkpoint-decode"], "cannot checkpoint its blocks"),
    (["--preset", "tiny-sd3", "--task", "t2v", "--num-frames", "5"], "text-to-image model: use task t2i"),
    (["--preset", "tiny-wan", "--task", "t2i", "--num-frames", "16", "--frames", "random", "--gif-fps", "8",
      "--reward", "brightness"], "Wan is a text-to-video model"),
    (["--preset", "tiny-flux", "--no-t5"], "no_t5 applies to SD3"),
    (["--noise", "cps"], "noise 'cps' is for flow-matching models (SD3, FLUX, Wan)"),
    (["--shift", "2"], "shift applies to flow-matching models"),
    (["--preset", "tiny-flux", "--scheduler", "dpm"], "FlowMatchEulerDiscreteScheduler"),
    (["--preset", "tiny-sd3", "--noise", "cps", "--eta", "1.5", "--eta-plan", "0.1"], "CPS etas must lie in [0, 1]"),
    (["--preset", "tiny-wan", "--num-frames", "4"], "4 k + 1 frames"),
])
def test_flow_model_settings_that_cannot_work_are_refused(tmp_path, capsys, args, match):
    _fails(tmp_path, capsys, args, match)


def test_a_launchers_mixed_precision_is_honoured_or_refused(tmp_path, capsys, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (which sets ACCELERATE_MIXED_PRECISION) on a run
    whose mixed_precision is no: exit 2 and how to set it; with --mixed-precision bf16 the run
    trains in bf16 (the frozen model's dtype)."""
    import json

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    err = _fails(tmp_path, capsys, [], "accelerate is set to mixed precision bf16")
    assert "pass --mixed-precision bf16" in err
    out = tmp_path / "bf16"
    assert main(["--preset", "tiny", "--steps", "1", "--mixed-precision", "bf16", "--output-dir", str(out),
                 "--no-progress"]) == 0
    assert json.load(open(out / "config.json"))["mixed_precision"] == "bf16"


@pytest.mark.parametrize("args,match", [
    (["--lr-warmup-steps", "100"], "lr_warmup_steps=100 is not shorter than the run (steps=6)"),
    (["--memory-budget", "2GiB"], "applies only with estimator auto, which trains the plan that fits the budget: "
                                  "add --estimator auto"),
    (["--estimator", "reinforce", "--reinforce-window", "5", "2"], "needs a <= b"),
])
def test_settings_that_cannot_work_say_what_to_do(tmp_path, capsys, args, match):
    _fails(tmp_path, capsys, args, match)


def test_a_mistyped_config_key_or_value_names_the_file_and_the_closest_keys(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("lrr: 0.001\nstep: 5\nlearning_rate: 0.001\n")
    err = _fails(tmp_path, capsys, ["--config", str(path)], f"unknown option(s) in config file {str(path)!r}: "
                                                             "'lrr' (did you mean lr?), 'step' (did you mean steps")
    assert "'learning_rate' (did you mean lr?)" in err                # diffusers' name for it
    assert len(err) < 300 and "zo_sigma" not in err                    # not every field
    path.write_text("lr: fast\n")
    _fails(tmp_path, capsys, ["--config", str(path)],
           f"lr must be of type float, got 'fast' (in config file {str(path)!r})")


def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that cannot be reached (here a closed local port: no network
    is touched) is found by one short probe, not by the hub client's retries (most of a minute)."""
    import time

    from halforder.diffusion.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_probed", {})
    start = time.perf_counter()
    err = _fails(tmp_path, capsys, ["--reward", "clipscore", "--reward-kwargs", '{"model": "nobody/no-such-clip"}'],
                 "could not load the CLIP score from 'nobody/no-such-clip': the hub at http://127.0.0.1:9 cannot be "
                 "reached")
    assert "nobody/no-such-clip is not in the local cache" in err and "HF_HUB_OFFLINE=1" in err
    assert time.perf_counter() - start < 15, err
