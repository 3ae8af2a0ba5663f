"""halforder train: reward fine-tuning of a diffusion model's LoRA with any estimator.

    halforder train --preset tiny --output-dir runs/tiny        # offline CPU smoke run
    halforder train --config runs/tiny/config.json --resume latest --steps 12

Every flag is a field of TrainConfig; a config file (YAML, TOML, JSON) sets the same, and a
run's config.json reproduces it. More: docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from ... import __version__
from ...training.checkpoints import latest_checkpoint
from .config import OTHER_NAMES, TrainConfig, load_config


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"target\": 0.5}'")
    return value


class Switch(argparse.BooleanOptionalAction):
    """argparse's ``--name`` / ``--no-name`` flag, whose underscore spellings parse too."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith(("--no-", "--no_")))


def did_you_mean(message: str) -> str:
    """An argparse error about a flag that diffusers' or trl's scripts use, with the flag meant here."""
    for flag in message.split(": ", 1)[-1].split():
        name = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
        if flag.startswith("--") and name in OTHER_NAMES:
            return f"{message}; did you mean --{OTHER_NAMES[name]}?"
    return message


def parser() -> argparse.ArgumentParser:
    """The parser of ``halforder train``, generated from :class:`TrainConfig`'s fields
    (``transformers.HfArgumentParser``). The help shows one spelling of each flag, with
    hyphens (the underscore spelling parses too), booleans as ``--name / --no-name``, and each
    default. Flags that are not given are absent from the parsed namespace, so they do not
    override a config file."""
    from transformers import HfArgumentParser

    class TrainParser(HfArgumentParser):
        def error(self, message: str):
            super().error(did_you_mean(message))

    p = TrainParser(TrainConfig, prog="halforder train", description=__doc__,
                    usage="halforder train [--config FILE] [--preset NAME] [--FLAG VALUE ...]",
                    formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32))
    defaults = TrainConfig().to_dict()
    switches = {}
    for action in list(p._actions):
        if action.dest not in defaults:
            continue
        if isinstance(defaults[action.dest], bool):      # replaced below by one switch
            switches.setdefault(action.dest, action.help)
            p._remove_action(action)
            for group in p._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            for flag in action.option_strings:
                p._option_string_actions.pop(flag, None)
            continue
        if action.dest in ("reward_kwargs", "eval_rewards"):
            action.type, action.metavar = _json_mapping, "JSON"
        action.help = f"{action.help} (default: {_show(defaults[action.dest])})"
        action.default = argparse.SUPPRESS
        action.metavar = _metavar(action, defaults[action.dest])
        action.option_strings = [f for f in action.option_strings if "_" not in f] or action.option_strings
    for name, help in switches.items():
        flag = name.replace("_", "-")
        switch = p.add_argument(f"--{flag}", action=Switch, dest=name, default=argparse.SUPPRESS,
                                help=f"{help} (default: {'on' if defaults[name] else 'off'})")
        for alias in (f"--{name}", f"--no_{name}"):
            p._option_string_actions[alias] = switch
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help="a config file; flags override it")
    p.add_argument("--version", action="version", version=f"halforder {__version__}")
    return p


def _metavar(action: argparse.Action, default: Any) -> str:
    """A short placeholder: the choices if they are few, else the kind of value."""
    if action.choices is not None:
        shown = "{" + ",".join(map(str, action.choices)) + "}"
        return shown if len(shown) <= 14 else "NAME"
    if action.metavar == "JSON":
        return "JSON"
    kind = action.type if action.type in (int, float) else type(default) if default is not None else str
    return {int: "N", float: "X"}.get(kind, "S")


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return json.dumps(v) if isinstance(v, dict) else str(v)


def check_launcher_precision(launcher: str, run: str) -> None:
    """Refuse a mixed precision that accelerate was launched with (``accelerate launch
    --mixed_precision`` or its config file, which the launcher passes on as
    ``ACCELERATE_MIXED_PRECISION``) but the run does not use: the run's precision is its own
    ``mixed_precision`` (the frozen model's dtype, no autocast)."""
    if str(launcher) not in ("no", str(run)):
        raise ValueError(f"accelerate is set to mixed precision {launcher} (its launch flag, "
                         f"ACCELERATE_MIXED_PRECISION or its config file), but this run's mixed_precision is "
                         f"{run}: pass --mixed-precision {launcher} to train the frozen model in {launcher}, or "
                         "launch with --mixed_precision no")


def _resume_hint(cfg: TrainConfig | None) -> str:
    """How to continue an interrupted run, in one line."""
    out = cfg.output_dir if cfg is not None else None
    found = latest_checkpoint(os.path.join(out, "checkpoints")) if out else None
    if found is None:
        return "no checkpoint was written, so there is nothing to resume"
    command = ["halforder", "train", "--config", os.path.join(out, "config.json"), "--resume", "latest",
               "--steps", str(cfg.steps)]
    return f"resume from {found} with: {shlex.join(command)}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``halforder train``; returns the exit status (2 on bad input, 130 on Ctrl-C)."""
    given = vars(parser().parse_args(sys.argv[1:] if argv is None else argv))
    path = given.pop("config", None)
    cfg = None
    try:
        try:
            cfg = load_config(path, given)
            from ...training.loop import make_accelerator
            from .run import prepare, run

            # no autocast: the run's precision is its mixed_precision (the frozen model's dtype)
            acc = make_accelerator(report_to=cfg.report_to, output_dir=cfg.output_dir)
            launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
            check_launcher_precision(launcher, cfg.mixed_precision)
            prepared = prepare(cfg, acc.device)
        except (ValueError, OSError) as e:
            print(f"halforder train: error: {e}", file=sys.stderr)
            return 2
        result = run(cfg, prepared, acc)
    except KeyboardInterrupt:
        print(f"halforder train: interrupted; {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    if acc.is_main_process:
        last = next((r for r in reversed(result.metrics) if "reward_mean" in r), {})
        reward = last.get("reward_mean")
        spent = last.get("evaluations")
        print(f"trained {result.step} updates ({cfg.estimator}, model {cfg.model}); last reward mean "
              f"{'n/a' if reward is None else f'{reward:.4g}'}; "
              f"{'' if spent is None else f'{spent:,} denoiser evaluations per sample in all; '}"
              f"outputs in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
