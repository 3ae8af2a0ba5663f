"""The experiments on an install without the extras they need: each command stops at once,
with exit status 2 and one line that gives the pip command, before doing any work.

A ``sitecustomize`` module on the path blocks the package in the child process (an entry
of None in ``sys.modules``: found nowhere, and its import fails), and the command runs as
the README writes it, in an empty folder.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command,blocked,extras", [
    ("-m experiments.run_all --quick", "matplotlib", "plots"),
    ("-m experiments.e1_unbiasedness --quick", "matplotlib", "plots"),
    ("experiments/finetune_cpu.py --quick", "matplotlib", "plots"),
    ("experiments/no_gradient.py --quick", "diffusers", "diffusion"),
    ("experiments/step_gradients.py --quick", "diffusers", "diffusion"),
    ("-m experiments.e9_field_estimators --quick", "diffusers", "diffusion"),
    ("experiments/diagnose_cpu.py --quick", "matplotlib", "plots"),
])
def test_a_missing_extra_ends_the_experiment_at_once(tmp_path, command, blocked, extras):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{blocked!r}] = None\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    argv = command.split()
    if argv[0] != "-m":
        argv[0] = str(REPO / argv[0])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO / "src"), str(REPO)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"the {extras} extra ({blocked})" in proc.stderr
    assert proc.stderr.rstrip().endswith(f'pip install -e ".[{extras}]"'), proc.stderr
    assert list(cwd.iterdir()) == []   # nothing written


def test_the_readmes_say_which_extras_the_experiments_need():
    for readme in (REPO / "README.md", REPO / "experiments" / "README.md"):
        assert 'pip install -e ".[plots,diffusion]"' in readme.read_text(), readme
