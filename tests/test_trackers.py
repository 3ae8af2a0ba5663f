"""Where the training loop's records go (``report_to``): metrics.jsonl by default, and
accelerate's trackers only when named; evaluation images with their prompts and rewards."""
import json
import os
import sys
import types

import pytest
import torch

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.tracking import GeneralTracker  # noqa: E402

from halforder.estimators import Plan  # noqa: E402
from halforder.estimators.samplers import FixedPlan  # noqa: E402
from halforder.training.config import ConfigError  # noqa: E402
from halforder.training.loop import Hooks, make_accelerator, train  # noqa: E402
from halforder.training.trackers import SampleImages  # noqa: E402
from test_training import ToyTask as Task, _cfg as loop_cfg  # noqa: E402  (the loop's toy task and settings)

PROMPTS = ["a red square", "a blue circle"]


class Recorder(GeneralTracker):
    """An accelerate tracker that keeps what it is sent."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logs, self.images = None, [], []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = dict(values)

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, {k: tuple(v.shape) for k, v in values.items()}))


def _cfg(tmp_path, **kw):
    return loop_cfg(tmp_path, **{"steps": 2, "eval_every": 2, **kw})


def _evaluate(step):
    images = torch.full((2, 3, 4, 4), 0.5)
    return {"reward_mean": 0.25 + step, "samples": SampleImages(images, PROMPTS, [0.5 + step, step])}


def test_tensorboard_is_not_used_just_because_it_is_installed(tmp_path, monkeypatch):
    made = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda *a, **k: made.append(a) or types.SimpleNamespace(
        add_scalar=lambda *a, **k: None, close=lambda: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    cfg = _cfg(tmp_path)
    train(Task(), FixedPlan(Plan.rlr(4, 2, 2)), ["p"], cfg)
    assert made == []
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoints", "config.json", "metrics.jsonl"]


@pytest.mark.parametrize("name, hint", [("tensorboard", "pip install 'halforder[tensorboard]'"),
                                        ("wandb", "pip install wandb")])
def test_a_named_tracker_that_is_not_installed_is_an_error(tmp_path, monkeypatch, name, hint):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, f"is_{name}_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"report_to {name} needs the {name} package, which is not installed: "
                                         f"{hint.replace('[', '.').replace(']', '.')}"):
        make_accelerator(cpu=True, report_to=["jsonl", name], output_dir=str(out))
    assert not out.exists()


def test_report_to_accepts_only_known_trackers(tmp_path):
    with pytest.raises(ConfigError, match="report_to must be one of jsonl, tensorboard, wandb"):
        _cfg(tmp_path, report_to=["jsonl", "mlflow"])


def test_trackers_get_every_record_and_the_samples_with_prompts_and_rewards(tmp_path):
    rec = Recorder()
    acc = Accelerator(cpu=True, log_with=[rec])
    cfg = _cfg(tmp_path)
    result = train(Task(), FixedPlan(Plan.rlr(4, 2, 2)), ["p"], cfg, accelerator=acc, hooks=Hooks(evaluate=_evaluate))
    assert rec.config["lr"] == cfg.lr and rec.config["report_to"] == json.dumps(["jsonl"])
    scalars = {(step, k): v for step, values in rec.logs for k, v in values.items()}
    for step in (1, 2):
        assert {"reward_mean", "grad_norm", "grad_norm_ZO"} <= {k for s, k in scalars if s == step}
    assert scalars[(0, "eval/reward_mean")] == 0.25 and scalars[(2, "eval/reward_mean")] == 2.25
    assert rec.images == [(0, {"eval/samples": (2, 3, 4, 4)}), (2, {"eval/samples": (2, 3, 4, 4)})]
    table = scalars[(2, "eval/samples_prompts")]
    assert "| 0 | a red square | 2.5 |" in table and "| 1 | a blue circle | 2 |" in table
    # the JSONL record keeps the prompts and rewards, not the images
    recs = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert recs == result.metrics
    evals = [r for r in recs if "eval" in r]
    assert evals[-1] == {"step": 2, "eval": {"reward_mean": 2.25, "samples": [
        {"prompt": "a red square", "reward": 2.5}, {"prompt": "a blue circle", "reward": 2.0}]}}
    assert acc.trackers == []    # closed at the end


def test_without_jsonl_no_metrics_file_is_written(tmp_path):
    cfg = _cfg(tmp_path, report_to=[])
    result = train(Task(), FixedPlan(Plan.rlr(4, 2, 2)), ["p"], cfg)
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert not os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl"))


def test_an_accelerator_without_the_named_trackers_is_refused_before_writing(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(tmp_path, report_to=["jsonl", "wandb"])
    with pytest.raises(ValueError, match="report_to names wandb, but the accelerator was built without it"):
        train(Task(), FixedPlan(Plan.rlr(4, 2, 2)), ["p"], cfg, accelerator=make_accelerator(cpu=True))
    assert not os.path.exists(cfg.output_dir)


def test_tensorboard_when_asked_for(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, report_to=["jsonl", "tensorboard"])
    acc = make_accelerator(cpu=True, report_to=cfg.report_to, output_dir=cfg.output_dir)
    train(Task(), FixedPlan(Plan.rlr(4, 2, 2)), ["p"], cfg, accelerator=acc, hooks=Hooks(evaluate=_evaluate))
    events = EventAccumulator(os.path.join(cfg.output_dir, "tensorboard", "halforder"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2]
    assert [(e.step, e.value) for e in events.Scalars("eval/reward_mean")] == [(0, 0.25), (2, 2.25)]
    assert [e.step for e in events.Images("eval/samples")] == [0, 2]


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """wandb 'installed', with no API key anywhere: no environment variable, an empty home."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_wandb_without_a_key_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys, no_wandb_key):
    from halforder.diffusion.app import run
    from halforder.diffusion.app.cli import main

    monkeypatch.setattr(run, "build_components", lambda *a, **k: pytest.fail("a model was built"))
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--report-to", "jsonl", "wandb", "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == ("halforder train: error: report_to wandb needs a W&B API key: run `wandb login` or set "
                   "WANDB_API_KEY, or set WANDB_MODE=offline to log locally\n")
    assert not out.exists()


@pytest.mark.parametrize("how", ["env", "offline", "netrc"])
def test_wandb_starts_with_a_key_or_offline(tmp_path, monkeypatch, no_wandb_key, how):
    from halforder.training.trackers import log_with

    if how == "env":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif how == "offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
    else:
        home = tmp_path / "home"
        home.mkdir()
        (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
        (home / ".netrc").chmod(0o600)
    assert log_with(["jsonl", "wandb"]) == ["wandb"]


def test_wandb_files_go_under_the_output_directory(tmp_path):
    from halforder.training.trackers import start

    seen = {}
    acc = types.SimpleNamespace(log_with=["wandb"], init_trackers=lambda project, config, init_kwargs: seen.update(
        project=project, init_kwargs=init_kwargs))
    start(acc, ["jsonl"], {"lr": 0.1}, str(tmp_path / "run"))
    assert seen == {"project": "halforder", "init_kwargs": {"wandb": {"dir": str(tmp_path / "run")}}}
