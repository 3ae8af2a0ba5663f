"""Smoke test of benchmarks/sd_scale.py --tiny: every plan's row and the agreement checks are
written (no timing is asserted; the memory goal is checked on the tiny chain). The run is the
README's command, run once in the clone (``run_in_clone``), which
tests/test_readme_commands.py also checks."""
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]
CLONE_COMMANDS = [SD_SCALE] = ["python benchmarks/sd_scale.py --tiny"]


def test_sd_scale_tiny_writes_every_plan_and_meets_the_memory_goal(clone, run_in_clone):
    proc = run_in_clone(SD_SCALE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sd_scale
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    text = (clone / "runs" / "sd_scale" / "tiny_cpu.md").read_text()
    names = [name for name, _, _ in sd_scale.plans(6)]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in names}
    assert sorted(rows) == sorted(names)
    for name, cells in rows.items():
        lean_ratio = float(cells[2])
        assert lean_ratio <= 1.1, (name, lean_ratio)   # the goal: one step graph plus the states
    agreement = [line for line in text.splitlines() if line.startswith("| vmap vs loop") or line.startswith("| bf16 vs")]
    assert len(agreement) == 2
    for line in agreement:
        assert all(re.fullmatch(r"\d\.\d\de[-+]\d\d", c.strip()) for c in line.split("|")[2:-1])
