"""Every command in README.md, run the way a new user would, leaves ``git status`` clean; the
README's Python examples give the outputs it shows; its stated times agree with the other
places that state them, and it says how to get the CPU build of torch.

The commands run in a copy of the working tree that is its own git repository (so that the
developer's own ``runs/`` does not interfere). Each command found in the README must be
listed in ``HOW``: run as written, run with extra flags that make it cheaper (same outputs,
same places), or not run, with the reason. A command runs once a session (``run_in_clone``):
the tests that check its outputs read that one run.
"""
import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PROGRAMS = ("python", "python3", "halforder", "torchrun", "accelerate", "pip", ".")

# command (as written in the README) -> extra flags to run it with, or the reason it is not run
RUN = ""
HOW = {
    "python3 -m venv .venv": "not run: creates .venv/, a git-ignored path (test_setup_outputs_are_ignored)",
    ". .venv/bin/activate": "not run: changes the calling shell only",
    "pip install torch==2.13.0 -e .": "not run: needs the network; writes git-ignored paths only",
    'pip install torch==2.13.0 -e ".[test,diffusion,plots,ocr]"': "not run: needs the network; writes git-ignored paths only",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": "not run: needs the network",
    'pip install -e ".[diffusion]"': "not run: needs the network; writes git-ignored paths only",
    'pip install -e ".[plots,diffusion]"': "not run: needs the network; writes git-ignored paths only",
    "halforder train --preset tiny --reward color --reward-kwargs '{\"target\": [0, 1, 0]}' --output-dir runs/tiny-color": RUN,
    "python -m pytest -q": "not run: the test suite, this test included",
    "halforder demo": RUN,
    "python -m experiments.run_all": "not run: about an hour; it rewrites docs/results/, e1-e7 byte for byte (e8 measures CPU times)",
    "python -m experiments.run_all --quick": "not run here: tests/test_experiments_smoke.py runs it as written in the "
                                             "same copy of the tree, checks its outputs and that git status stays clean",
    "python experiments/finetune_cpu.py --jobs 2 --out runs/finetune": "not run: 42 min (its --quick form is run)",
    "python experiments/step_gradients.py --out runs/step-gradients": "--quick",  # outputs in test_finetune_quick.py
    "python experiments/finetune_cpu.py --quick": RUN,  # outputs in test_finetune_quick.py
    "python experiments/no_gradient.py --jobs 2 --out runs/no-gradient": "not run: 63 min (its --quick form is run)",
    "python experiments/no_gradient.py --quick": RUN,  # outputs in test_no_gradient_quick.py
    "halforder train --preset tiny --output-dir runs/tiny": RUN,  # outputs in diffusion/test_cli_output.py
    "halforder train --preset tiny-video --output-dir runs/tiny-video": RUN,  # outputs in diffusion/test_video_cli.py
    ("halforder train --model CompVis/stable-diffusion-v1-4 --prompts prompts.txt --reward aesthetic --estimator rlr "
     "--h 2 --j-sampling uniform --zo-sigma 1e-3 --T 50 --steps 2000 --lr 5e-4 --batch-size 4 --grad-accum 2 "
     "--mixed-precision bf16 --output-dir runs/sd14-aesthetic"): "not run: needs a GPU and the model's download",
    "halforder train --help": RUN,
    "halforder train --preset tiny-sd3 --output-dir runs/tiny-sd3": RUN,
    "halforder train --preset tiny-flux --output-dir runs/tiny-flux": RUN,
    "halforder train --preset tiny-wan --output-dir runs/tiny-wan": RUN,
    ("halforder train --preset sd35m --prompts prompts.txt --reward aesthetic --mixed-precision bf16 "
     "--output-dir runs/sd35m"): "not run: needs a GPU and the model's download",
    ("halforder train --preset flux-dev --prompts prompts.txt --reward aesthetic --mixed-precision bf16 "
     "--output-dir runs/flux-dev"): "not run: needs a GPU and the model's download",
    ("halforder train --preset wan21 --prompts prompts.txt --reward aesthetic --frames random --mixed-precision bf16 "
     "--output-dir runs/wan21"): "not run: needs a GPU and the model's download",
    "halforder train": "not run: the layout list naming the command, not a command line",
    "halforder plan": "not run: the prose naming the command, not a command line",
    "halforder diagnose": "not run: the prose naming the command, not a command line",
    "halforder export CHECKPOINT OUT": "not run: placeholders (tests/diffusion/test_export.py)",
    "halforder export": "not run: the layout list naming the command, not a command line",
    "torchrun --standalone --nproc_per_node 2 -m halforder train ...": "not run: elided (tests/diffusion/test_multiprocess.py)",
    "accelerate launch --num_processes 8 -m halforder train ...": "not run: needs 8 GPUs",
    "python benchmarks/toy_throughput.py": "--n 256 --repeats 1",
    "python benchmarks/diffusion_memory.py --out runs/diffusion_memory.md": "--T 5 6 --repeats 1",
    "python benchmarks/video_memory.py --out runs/video_memory.md": "--T 4 --num-frames 2",
    "python benchmarks/sd_scale.py --tiny": RUN,  # outputs in test_sd_scale_smoke.py
    "halforder plan --preset tiny --memory 2GiB": "--plan-pilots 8",
}


RUNS = [f"{c} {how}".strip() for c, how in HOW.items() if not how.startswith("not run")]
CLONE_COMMANDS = RUNS   # started in the background with the session (conftest.run_in_clone)


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README: indented code lines (backslash continuations joined)
    and inline code spans that start with a program, each split at ``&&``, comments dropped."""
    lines, found, block = text.splitlines(), [], ""
    for line in lines:
        if line.startswith("    ") and not line.lstrip().startswith(">>>"):
            block += " " + line.strip()
            if block.endswith("\\"):
                block = block[:-1]
                continue
            found.append(block.strip())
        block = ""
    found += re.findall(r"`([^`\n]+)`", text)
    commands = []
    for c in found:
        for part in c.split(" && "):
            part = re.sub(r"\s+#.*$", "", " ".join(part.split()))
            if part.split(" ")[0] in PROGRAMS and part not in commands:
                commands.append(part)
    return commands


COMMANDS = readme_commands(README.read_text())


def test_every_readme_command_is_listed():
    assert set(COMMANDS) == set(HOW), (sorted(set(COMMANDS) - set(HOW)), sorted(set(HOW) - set(COMMANDS)))


@pytest.mark.parametrize("command", RUNS)
def test_readme_command_leaves_git_status_clean(run_in_clone, command):
    """The command's one run in the clone (shared with the tests that check its outputs)."""
    proc = run_in_clone(command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.status == ""


def test_setup_outputs_are_ignored(clone):
    # what the set-up and test commands write: the environment, pip's metadata, pytest's caches
    for path in (".venv/bin/python", "src/halforder.egg-info/PKG-INFO", "build/lib/x.py", ".pytest_cache/v",
                 ".hypothesis/examples/x", "runs/anything"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=clone).returncode == 0, path


def test_readme_python_examples_give_the_outputs_shown(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 20 and result.failed == 0


def test_readme_checks_the_estimate_through_its_standard_errors():
    # the API example does not leave the relative error as the only check against the truth
    text = README.read_text()
    assert "mean_test(s.grad, t).pvalue" in text and "s.grad.std(0) / s.n ** 0.5" in text


def _time(path: Path, quick: bool) -> list[str]:
    """The times stated on the lines that run ``experiments.run_all`` (with or without --quick)."""
    lines = [line for line in path.read_text().splitlines()
             if "python -m experiments.run_all" in line and ("--quick" in line) == quick]
    return [t for line in lines for t in re.findall(r"about (\d+ (?:min|s)) on one core", line)]


@pytest.mark.parametrize("quick", [False, True])
def test_run_all_time_is_one_figure_everywhere(quick):
    places = [README, REPO / "experiments" / "README.md", REPO / "experiments" / "run_all.py",
              REPO / "docs" / "results.md"]
    times = {str(p.relative_to(REPO)): _time(p, quick) for p in places}
    assert all(len(t) == 1 for t in times.values()), times
    assert len({t[0] for t in times.values()}) == 1, times


def test_readme_says_how_to_get_the_cpu_build_of_torch():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README.read_text()


def test_the_python_version_is_one_claim():
    """The README's Python version is pyproject's floor, and the one these tests run on."""
    import tomllib

    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    stated = re.search(r"^Python (3\.\d+)", README.read_text(), re.M).group(1)
    assert floor == f">={stated}"
    assert sys.version_info[:2] >= tuple(map(int, stated.split(".")))
