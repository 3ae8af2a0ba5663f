"""Files written whole or not at all: every output of a run goes through these helpers.

A file or directory is written under a temporary name beside its final one and renamed
into place, so a crash leaves the old version or the complete new one, never half of
one. Temporary names start with ``.tmp-``. Modes follow the process's umask, as a plain
``open`` or ``mkdir`` would, for everything written (``tempfile`` and some writers, such as
safetensors, would make them private).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(root: str) -> None:
    """Give ``root`` and everything under it the mode a plain ``open`` or ``mkdir`` would."""
    mask = _umask()
    if not os.path.isdir(root):
        os.chmod(root, 0o666 & ~mask)
        return
    for parent, _, files in os.walk(root):
        os.chmod(parent, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def check_writable_dir(path: str) -> None:
    """Raise ``NotADirectoryError`` or ``PermissionError`` (with a message naming ``path``)
    unless ``path`` is a directory this process can write into, or can be created as one."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"output directory {path!r} is a file, not a directory"
                                 if existing == os.path.abspath(path) else
                                 f"output directory {path!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {path!r} is not writable ({existing!r}: permission denied)")


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path to write; renamed to ``path`` when the block ends without error.

        with atomic_file("out/grid.png", ".png") as tmp:
            image.save(tmp)
    """
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=parent)
    os.close(fd)
    try:
        yield tmp
        _follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """A temporary directory to fill; it replaces ``path`` (and whatever was there) when the
    block ends without error."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        _follow_umask(tmp)
        if os.path.exists(path):  # swap, then drop the old one
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented strict JSON (no NaN or inf) atomically."""
    write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Append one strict-JSON line (a record is one small write)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
