"""Sizes and durations as people write them: ``2GiB``, ``250ms``."""
from __future__ import annotations

import re

_BYTES = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_bytes(text: str) -> int:
    """A size like ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000`` (bytes) as bytes;
    ``ValueError`` naming the accepted units otherwise."""
    return int(_parse(text, _BYTES, "size", "2GiB, 512MiB, 1.5GB or a number of bytes"))


def parse_seconds(text: str) -> float:
    """A duration like ``1s``, ``250ms``, ``2min`` or ``0.5`` (seconds) as seconds;
    ``ValueError`` naming the accepted units otherwise."""
    return _parse(text, _SECONDS, "duration", "1s, 250ms, 2min or a number of seconds")


def _parse(text: str, units: dict, what: str, examples: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"not a {what}: {text!r} (write e.g. {examples})")
    value = float(m.group(1)) * units[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"a {what} must be > 0, got {text!r}")
    return value


def format_bytes(b: float) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{int(b)} B"

