"""`halforder train --resume` on the tiny preset: Ctrl-C ends a run with one line that says how
to resume and exit status 130; that command continues the run, keeps its config.json and
records what it changed; a resume with other settings, or with nothing left to train, is
refused (exit status 2, nothing written)."""
import json
import os
import re
import shlex

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import halforder.training.update_rules as update_rules  # noqa: E402
from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.training.checkpoints import save_checkpoint  # noqa: E402



def _snapshot(out):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(out) for f in fs}


def _refused(capsys, out, args, *matches):
    before = _snapshot(out)
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", "--resume", "latest", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: ") and err.count("\n") == 1, err
    for m in matches:
        assert re.search(m, err), (m, err)
    assert _snapshot(out) == before


def test_interrupt_then_resume_with_the_printed_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real, calls = update_rules.OnPolicy.updates, []

    def interrupted_at_update_2(self, *args, **kw):       # one call per update
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(update_rules.OnPolicy, "updates", interrupted_at_update_2)
    assert main(["--preset", "tiny", "--steps", "3", "--checkpoint-every", "1", "--output-dir", str(out),
                 "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("halforder train: interrupted; resume from ") and "step_00000001" in err, err
    command = shlex.split(err.split(" with: ")[1])
    assert command[:2] == ["halforder", "train"] and "--resume" in command
    config = (out / "config.json").read_bytes()

    monkeypatch.setattr(update_rules.OnPolicy, "updates", real)
    assert main(command[2:] + ["--eval-every", "1"]) == 0       # a setting a resume may change
    assert (out / "config.json").read_bytes() == config
    rec, = [json.loads(line) for line in open(out / "resumes.jsonl")]
    assert rec["step"] == 1 and rec["changes"] == {"eval_every": [3, 1], "resume": [None, "latest"]}
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "reward_mean" in r] == [1, 2, 3]
    assert sorted(os.listdir(out / "samples")) == [f"step_0000000{i}.png" for i in (0, 2, 3)]

    _refused(capsys, out, ["--steps", "5", "--estimator", "full", "--T", "8", "--reward", "random_cnn", "--lr", "0.5",
                           "--lora-rank", "3"],
             r"cannot resume .*step_00000003", "lr was 0.01, now 0.5", "T was 6, now 8", "reward was 'brightness'",
             "estimator was 'rlr', now 'full'", "lora_rank was 2, now 3", r"A resume may change only .*steps")
    _refused(capsys, out, ["--steps", "5", "--j-sampling", "softmax"], "j_sampling was 'uniform', now 'softmax'")
    _refused(capsys, out, ["--steps", "3"], r"nothing to resume: .* at update 3, so the run of steps=3 is complete")
    _refused(capsys, out, ["--steps", "2"], r"at update 3, past steps=2; pass --steps N with N > 3")


def test_interrupt_before_a_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(update_rules.OnPolicy, "updates", interrupt)
    assert main(["--preset", "tiny", "--steps", "1", "--eval-every", "0", "--output-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 130
    assert capsys.readouterr().err == ("halforder train: interrupted; no checkpoint was written, so there is "
                                       "nothing to resume\n")


def test_a_checkpoint_of_other_parameters_is_refused_before_training(tmp_path, capsys):
    """A checkpoint without its run's settings is checked against the model's LoRA weights and the
    plan sampler's state before anything is written."""
    import torch

    out = tmp_path / "run"
    save_checkpoint(str(out / "checkpoints"), 1, {"a": torch.zeros(2)}, {}, {}, [{}])
    _refused(capsys, out, ["--lora-rank", "3"], "holds other parameters than the model")
