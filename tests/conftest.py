"""Fixtures shared by the test modules."""
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


QUEUED: list[str] = []   # the commands the selected tests will run in the clone, in collection order


def pytest_collection_finish(session):
    """Queue the clone commands of the selected tests that use ``run_in_clone``: a test
    parametrized by one of its module's ``CLONE_COMMANDS`` (``command``) queues that one, any
    other queues its module's."""
    for item in session.items:
        declared = getattr(item.module, "CLONE_COMMANDS", ())
        if "run_in_clone" not in getattr(item, "fixturenames", ()):
            continue
        param = getattr(getattr(item, "callspec", None), "params", {}).get("command")
        for command in [param] if param in declared else declared:
            if command not in QUEUED:
                QUEUED.append(command)


@pytest.fixture(scope="session")
def run_in_clone(clone, clone_status):
    """``run_in_clone(command)``: a command line of the README (``halforder ...`` or
    ``python ...``) run in :func:`clone` as a new user would run it (a fresh process, offline,
    umask 022, one torch thread), once a session: the tests that check the same command's
    outputs share its one run. Its ``subprocess.CompletedProcess``, with ``status``: the
    clone's ``git status`` right after it, and ``finished``: when it ended (``time.time()``).

    The commands the selected tests declare (``CLONE_COMMANDS``) run one after another in a
    background thread from the start of the session, in collection order, so that they use
    the second core while the tests run in this process; a command asked for that was not
    declared runs at once. The environment is the session's at its start (a test's
    ``monkeypatch.setenv`` does not reach them); at the end, commands not started are
    dropped and a running one is stopped."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(clone / "src"), str(clone)]), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    running: set[subprocess.Popen] = set()

    def run(command: str) -> subprocess.CompletedProcess:
        argv = shlex.split(command)
        if argv[0] == "halforder":
            argv = [sys.executable, "-m", "halforder.cli", *argv[1:]]
        elif argv[0] in ("python", "python3"):
            argv = [sys.executable, *argv[1:]]
        with subprocess.Popen(argv, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              umask=0o022) as p:
            running.add(p)
            try:
                out, err = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                raise
            finally:
                running.discard(p)
        proc = subprocess.CompletedProcess(argv, p.returncode, out, err)
        proc.status, proc.finished = clone_status(), time.time()
        return proc

    pool = ThreadPoolExecutor(1)
    runs = {command: pool.submit(run, command) for command in QUEUED}

    def result(command: str) -> subprocess.CompletedProcess:
        if command not in runs:
            runs[command] = Future()
            runs[command].set_result(run(command))
        return runs[command].result()

    yield result
    for future in runs.values():
        future.cancel()
    for p in list(running):
        p.kill()
    pool.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _start_clone_commands(request):
    """Start the queued clone commands with the session (only where some test declares any)."""
    if QUEUED:
        request.getfixturevalue("run_in_clone")
