"""Fixtures shared by the test modules."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def git(cwd, *args) -> str:
    """``git args`` in ``cwd``; its standard output."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def clone(tmp_path_factory):
    """The working tree's files (tracked, and untracked but not ignored) in a fresh repository,
    where README commands run as a new user would run them."""
    root = tmp_path_factory.mktemp("clone")
    for name in git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if name and (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "copy")
    assert git(root, "status", "--porcelain") == ""
    return root


@pytest.fixture(scope="session")
def clone_status(clone):
    """``git status --porcelain`` of :func:`clone`, untracked files included, as a function."""
    return lambda: git(clone, "status", "--porcelain", "--untracked-files=all")
