"""`halforder train`: the tiny preset end to end, config files, every setting as a flag and a
config key, the help, reproducing a run from its config.json, and bad input (clear error,
nothing written)."""
import dataclasses
import json
import os
import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.cli import main, parser  # noqa: E402
from halforder.diffusion.app.config import TrainConfig, load_config  # noqa: E402
from halforder.diffusion.rewards import REWARDS  # noqa: E402
from halforder.training.checkpoints import save_checkpoint  # noqa: E402



def test_tiny_preset_writes_metrics_grid_adapter_and_checkpoints(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    out = tmp_path / "tiny"
    assert main(["--preset", "tiny", "--steps", "3", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained 3 updates" in printed
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    updates = [r for r in recs if "plan" in r]
    assert [r["step"] for r in updates] == [1, 2, 3]
    # the CLI's run reports its compute: RLR(h=2) costs T + 2 forward and 3 backward steps per sample
    config = json.load(open(out / "config.json"))
    n = config["batch_size"] * config["grad_accum"]
    assert [r["evaluations"] for r in updates] == [k * n * (config["T"] + 2 + 3) for k in (1, 2, 3)]
    assert f"{updates[-1]['evaluations']:,} denoiser evaluations" in printed
    for r in updates:
        assert not r["skipped"] and r["plan"].startswith("rlr(h=2,j=")
        assert 0 <= r["reward_mean"] <= 1                              # brightness of images in [0, 1]
        for key in ("reward_std", "grad_norm", "grad_norm_HO", "grad_norm_ZO", "time_s", "memory_bytes"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, key
        assert r["grad_norm_FO"] >= 0
    assert sorted(os.listdir(out / "samples")) == ["step_00000000.png", "step_00000003.png"]
    im = Image.open(out / "samples" / "step_00000003.png")
    assert im.size == (2 * 16 + 1, 2 * 16 + 1)                       # 4 held-out prompts, 16x16 images
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in k for k in lora)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003"]
    assert json.load(open(out / "config.json"))["preset"] == "tiny"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_config_files_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\nlr: 0.5\nestimator: truncated\nk: 3\nadam_betas: [0.8, 0.99]\n")
    t = tmp_path / "c.toml"
    t.write_text('preset = "tiny"\nlr = 0.5\nestimator = "truncated"\nk = 3\nadam_betas = [0.8, 0.99]\n')
    j = tmp_path / "c.json"
    j.write_text('{"preset": "tiny", "lr": 0.5, "estimator": "truncated", "k": 3, "adam_betas": [0.8, 0.99]}')
    for path in (y, t, j):
        cfg = load_config(str(path), {"k": 2, "steps": None})
        assert (cfg.lr, cfg.estimator, cfg.k, cfg.steps, cfg.T, cfg.adam_betas) == (0.5, "truncated", 2, 6, 6,
                                                                                    [0.8, 0.99])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        load_config(str(bad))
    (tmp_path / "c.ini").write_text("[train]\nlr = 1\n")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):
        load_config(str(tmp_path / "c.ini"))
    assert TrainConfig.__doc__ and TrainConfig().T == 50


def _fails(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err
    assert not out.exists()                                   # nothing half-written


def test_unknown_reward(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--reward", "beauty"], "unknown reward 'beauty'")


def test_missing_model_path(tmp_path, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n")
    _fails(tmp_path, capsys, ["--prompts", str(p), "--model", str(tmp_path / "no" / "such" / "model")],
           "does not exist")


def test_empty_prompt_file(tmp_path, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("\n  \n")
    _fails(tmp_path, capsys, ["--prompts", str(p)], "is empty")


def test_h_larger_than_T(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--T", "4", "--h", "5"], "h=5 is too large")


def test_bad_window(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--j-sampling", "window", "--j-window", "2", "3"], "b - a > h")


def test_corrupted_checkpoint(tmp_path, capsys):
    import torch
    ck = save_checkpoint(str(tmp_path / "ck"), 1, {"a": torch.zeros(2)}, {}, {}, [{}])
    with open(os.path.join(ck, "optimizer.pt"), "ab") as f:
        f.write(b"junk")
    _fails(tmp_path, capsys, ["--resume", ck], "corrupted: optimizer.pt")


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path, capsys):
    import torch
    out = tmp_path / "out"
    save_checkpoint(str(out / "checkpoints"), 1, {"a": torch.zeros(2)}, {}, {}, [{}])
    before = sorted(os.listdir(out))
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_plan_that_does_not_fit_the_chain(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--estimator", "reinforce", "--eta", "0"], "needs inherent noise")


# ---------------------------------------------------------------------------- every setting, the help, reproduction
# A valid value other than the default for every TrainConfig field. Parsed only (no run), so a
# value need not work in a tiny run (e.g. task t2v, a hub model id), only pass TrainConfig.check.
SETTINGS = dict(
    steps=7, lr=1e-3, adam_betas=[0.8, 0.99], adam_eps=1e-6, weight_decay=0.01, batch_size=3, grad_accum=3,
    clip_norm=0.0, baseline="none", pairing="param", seed=5, output_dir=os.path.join("elsewhere", "run"), eval_every=7,
    checkpoint_every=7, keep_checkpoints=0, resume="latest", progress=False, report_to=["tensorboard", "wandb"],
    task="t2v", model="some-org/some-model", revision="v1.0", scheduler="dpm", T=20, guidance_scale=3.0,
    negative_prompt="blurry, low quality", mixed_precision="bf16", gradient_checkpointing=True, checkpoint_decode=True, compile="default", batching="loop",
    prompts="prompts.txt", eval_prompts="eval.txt", eval_num=2, dcot="dcot.yaml", dcot_split=[0.5, 0.25, 0.25],
    reward="brightness", reward_kwargs={"target": 0.5}, estimator="truncated_random", h=3, k=3,
    j_sampling="softmax", j=5, j_window=[2, 10], j_temperature=0.5, j_decay=0.5, zo_sigma=1e-2, eta="0.5",
    eta_plan=0.2, lora_rank=8, lora_alpha=8.0, lora_targets=["to_q", "to_v"],
    num_frames=8, frames="0,3,7", latent_size=[40, 64], video_model="videocrafter2", video_base="some-org/some-base",
    fps=28.0, gif_fps=4.0, preset="tiny", memory_budget="2GiB", time_budget="1s", plan_pilots=16,
    noise="cps", shift=2.5, t5=False, reinforce_window=[3, 6], lr_scheduler="cosine", lr_warmup_steps=10, ema=True,
    ema_decay=0.9, eval_rewards={"color": {"target": [0.0, 1.0, 0.0]}},
    group_size=4, global_std=True, clip_range=0.2, updates_per_rollout=2, kl_beta=0.01, step_fraction=0.5,
    window_length=2, window_position="sliding", window_every=5, step_weighting="field",
)
# Settings that are only valid together with another one.
VIDEO, VC2 = dict(task="t2v"), dict(task="t2v", video_model="videocrafter2")
NEEDS = dict(j=dict(j_sampling="fixed"), j_window=dict(j_sampling="window"), j_temperature=dict(j_sampling="softmax"),
             j_decay=dict(j_sampling="softmax"), dcot_split=dict(dcot="dcot.yaml"), batch_size=dict(pairing="none"),
             num_frames=VIDEO, frames=VIDEO, video_model=VIDEO, gif_fps=VIDEO, video_base=VC2, fps=VC2,
             k=dict(estimator="truncated"), memory_budget=dict(estimator="auto"),
             time_budget=dict(estimator="auto", memory_budget="2GiB"),
             plan_pilots=dict(estimator="auto", memory_budget="2GiB"), reinforce_window=dict(estimator="reinforce"),
             ema_decay=dict(ema=True), reward_kwargs=dict(reward="brightness"), global_std=dict(baseline="grpo"),
             **{name: dict(estimator="reinforce") for name in ("clip_range", "updates_per_rollout", "kl_beta",
                                                                "step_fraction", "window_length")},
             window_position=dict(estimator="reinforce", window_length=2),
             window_every=dict(estimator="reinforce", window_length=2, window_position="sliding"),
             step_weighting=dict(estimator="reinforce", step_fraction=0.5))
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _cli_values(v):
    if isinstance(v, bool):
        return [str(v).lower()]
    if isinstance(v, list):
        return [str(x) for x in v]
    if isinstance(v, dict):
        return [json.dumps(v)]
    return [str(v)]


def _same(got, want):
    """Equal, and of the same type (item by item for lists)."""
    if isinstance(want, list):
        return isinstance(got, list) and got == want and [type(x) for x in got] == [type(x) for x in want]
    return type(got) is type(want) and got == want


def _parse(args):
    """What `halforder train ARGS` would train with: the parsed flags through load_config, as main does."""
    given = vars(parser().parse_args(args))
    path = given.pop("config", None)
    return load_config(path, given)


def test_the_value_table_covers_every_field_with_a_non_default_value():
    assert sorted(SETTINGS) == sorted(FIELDS), "SETTINGS must name every TrainConfig field, and only those"
    default = TrainConfig()
    for name in FIELDS:
        assert SETTINGS[name] != getattr(default, name), name


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_a_flag(name):
    """Each field is one flag in the help (hyphens, as the README spells it); the underscore
    spelling parses too; a boolean is --name / --no-name."""
    p = parser()
    hyphen = f"--{name.replace('_', '-')}"
    shown = [a.option_strings for a in p._actions if a.dest == name]
    value = SETTINGS[name]
    assert shown == [[hyphen, f"--no-{hyphen[2:]}"] if isinstance(value, bool) else [hyphen]], shown
    for flag in sorted({f"--{name}", hyphen}):
        if isinstance(value, bool):
            args = [flag if value else f"--no{'_' if '_' in flag else '-'}{flag[2:]}"]
        else:
            args = [flag, *_cli_values(value)]
        for other, v in NEEDS.get(name, {}).items():
            args += [f"--{'' if v else 'no-'}{other}"] if isinstance(v, bool) else [f"--{other}", *_cli_values(v)]
        cfg = _parse(args)
        assert _same(getattr(cfg, name), value), (args, getattr(cfg, name))


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_a_config_file_key(tmp_path, name):
    import yaml

    value = SETTINGS[name]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({name: value, **NEEDS.get(name, {})}))
    for cfg in (load_config(str(path)), _parse(["--config", str(path)])):
        assert _same(getattr(cfg, name), value), (path.read_text(), getattr(cfg, name))


def _help_blocks(monkeypatch):
    """The help of each option, by its first flag (a wide terminal, so that no line is wrapped)."""
    monkeypatch.setenv("COLUMNS", "1000")
    text = parser().format_help()
    blocks = {}
    for block in re.split(r"\n(?=  -)", text)[1:]:
        blocks[block.split()[0].rstrip(",")] = " ".join(block.split())
    return text, blocks


def test_help_shows_every_default_and_the_reward_names(monkeypatch):
    text, blocks = _help_blocks(monkeypatch)
    assert "(default: " in text
    default = TrainConfig()
    for name in FIELDS:
        flag = f"--{name.replace('_', '-')}"
        assert flag in blocks, f"the help does not list {flag}"
        v = getattr(default, name)
        shown = (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else json.dumps(v) if isinstance(v, dict)
                 else ("on" if v else "off") if isinstance(v, bool) else str(v))
        assert f"(default: {shown})" in blocks[flag], blocks[flag]
    options = text.split("\noptions:\n", 1)[1]     # (the description quotes torchrun's own --nproc_per_node)
    assert not re.search(r"--[a-z0-9]+_[a-z_0-9]", options), "an underscore spelling in the help"
    for reward in REWARDS:
        assert re.search(rf"\b{re.escape(reward)}\b", blocks["--reward"]), (reward, blocks["--reward"])


def test_help_fits_150_lines_with_each_option_once(monkeypatch):
    """`halforder train --help` on an 80-column terminal: at most 150 lines, every flag once."""
    monkeypatch.setenv("COLUMNS", "80")
    text = parser().format_help()
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    options = text.split("\noptions:\n", 1)[1]
    flags = re.findall(r"^  (--[a-zA-Z0-9-]+)", options, re.M)
    assert len(flags) == len(set(flags)) >= len(FIELDS)


@pytest.mark.parametrize("theirs, ours", [("--learning_rate", "--lr"), ("--train_batch_size", "--batch-size"),
                                          ("--gradient_accumulation_steps", "--grad-accum"),
                                          ("--resume_from_checkpoint", "--resume"),
                                          ("--checkpointing_steps", "--checkpoint-every"),
                                          ("--checkpoints_total_limit", "--keep-checkpoints"),
                                          ("--mixed-precision=bf16", None)])
def test_diffusers_names_get_a_did_you_mean(capsys, theirs, ours):
    """Flags that diffusers' and trl's scripts spell otherwise: exit 2 and the flag meant here
    (--mixed_precision is the same setting in both: it parses)."""
    if ours is None:
        assert _parse([theirs.replace("-", "_", 2).replace("__", "--")]).mixed_precision == "bf16"
        return
    with pytest.raises(SystemExit) as e:
        parser().parse_args([theirs, "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"did you mean {ours}?"), err


def test_config_json_reproduces_the_run(tmp_path):
    """A run's own config.json, given back with only another output directory, reproduces the
    run: bit-identical metrics.jsonl records, except the wall-clock and memory keys time_s,
    elapsed_s and memory_bytes (they measure the machine, not the run)."""
    volatile = ("time_s", "elapsed_s", "memory_bytes")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--preset", "tiny", "--steps", "3", "--output-dir", str(a), "--no-progress"]) == 0
    assert main(["--config", str(a / "config.json"), "--output-dir", str(b)]) == 0

    def records(out):
        recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert all(k in r for r in recs if "plan" in r for k in volatile)
        return [{k: v for k, v in r.items() if k not in volatile} for r in recs]

    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra if "plan" in r] == [1, 2, 3]
    assert [r["step"] for r in ra if "eval" in r] == [0, 3]
    assert ra == rb
    ca, cb = json.load(open(a / "config.json")), json.load(open(b / "config.json"))
    assert cb.pop("output_dir") == str(b) and ca.pop("output_dir") == str(a)
    assert ca == cb


# ---------------------------------------------------------------------------- numbers in config files
def _sci(v) -> str:
    """``v`` in scientific notation without a decimal point where it has none (5e-4, 2e1,
    [8e-1, 9.9e-1]): the spelling YAML 1.1 reads as a string."""
    if isinstance(v, list):
        return "[" + ", ".join(map(_sci, v)) + "]"
    mantissa, exponent = f"{v:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
        isinstance(v, list) and bool(v) and all(map(_is_number, v)))


NUMERIC = [name for name in FIELDS if _is_number(SETTINGS[name])]


def test_the_numeric_fields_are_found():
    assert {"lr", "zo_sigma", "steps", "adam_betas", "latent_size", "dcot_split"} <= set(NUMERIC)


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("ext", ["yaml", "toml", "json"])
def test_scientific_notation_in_config_files(tmp_path, name, ext):
    """``lr: 5e-4`` is a string to YAML 1.1; every numeric field takes such a value from every format."""
    value = SETTINGS[name]
    entries = {name: _sci(value), **{k: json.dumps(v) for k, v in NEEDS.get(name, {}).items()}}
    path = tmp_path / f"c.{ext}"
    path.write_text({"yaml": "".join(f"{k}: {v}\n" for k, v in entries.items()),
                     "toml": "".join(f"{k} = {v}\n" for k, v in entries.items()),
                     "json": "{" + ", ".join(f'"{k}": {v}' for k, v in entries.items()) + "}"}[ext])
    for cfg in (load_config(str(path)), _parse(["--config", str(path)])):
        assert _same(getattr(cfg, name), value), (path.read_text(), getattr(cfg, name))


# ---------------------------------------------------------------------------- settings that do not apply
# Where a conditional setting whose SETTINGS value applies under the defaults does not apply.
OFF = dict(j_sampling=dict(estimator="full"), h=dict(estimator="full"), eta_plan=dict(eta="0.5"))


def test_every_conditional_setting_is_in_the_value_tables():
    assert set(TrainConfig().conditional()) <= set(NEEDS) | set(OFF)


@pytest.mark.parametrize("name", sorted(TrainConfig().conditional()))
def test_a_setting_that_does_not_apply_is_refused(name):
    """Set without what it needs (e.g. --j without --j-sampling fixed, --num-frames for images), a
    setting would be ignored: it is refused, naming what it needs; at its default it is accepted."""
    with pytest.raises(ValueError, match=rf"^{name}=.* has no effect here: it applies only with ") as e:
        load_config(None, {**OFF.get(name, {}), name: SETTINGS[name]})
    for other in NEEDS.get(name, {}):
        assert re.search(rf"\b{other}\b", str(e.value).split("applies only with")[1]), str(e.value)
    default = getattr(TrainConfig(), name)
    assert _same(getattr(load_config(None, {**OFF.get(name, {}), name: default}), name), default)


@pytest.mark.parametrize("values", [
    dict(memory_budget="2GiB"), dict(time_budget="1s"), dict(plan_pilots=16),
    dict(estimator="auto", memory_budget="2GiB", h=3), dict(k=3), dict(estimator="rlr", k=2),
    dict(eta="0.5", eta_plan=0.2),
])
def test_estimator_settings_that_do_not_apply_are_refused(values):
    """The plan search's budgets without estimator auto, h where no RLR block is drawn, k
    outside truncated backprop, eta_plan with a numeric eta: refused, not ignored."""
    name = [k for k in values if k not in ("estimator", "memory_budget", "eta")] or ["memory_budget"]
    with pytest.raises(ValueError, match=rf"^{name[0]}=.* has no effect here"):
        load_config(None, values)


def test_a_video_setting_for_images_ends_the_command_cleanly(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--num-frames", "8"], "num_frames=8 has no effect here: it applies only with task t2v")
