"""Loading from the Hugging Face hub or a local directory, and the one message for when
that fails offline.

Every loader asks :func:`offline` (``HF_HUB_OFFLINE``) whether it may touch the network,
:func:`looks_local` whether a name is a path, :func:`local_dir` whether such a path holds
what it needs, and raises :func:`load_error` when loading fails.
"""
from __future__ import annotations

import os
from typing import Sequence

_TRUE = ("1", "on", "true", "yes")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def looks_local(name: str) -> bool:
    """A name that is a path rather than a hub id: absolute, starting with ``.`` or ``~``,
    existing, or with more than one ``/`` (a hub id is ``owner/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


def local_dir(path: str, what: str, subfolders: Sequence[str] = ()) -> str:
    """``path`` expanded, after checking that it is a directory with ``subfolders``
    (``FileNotFoundError`` naming ``what`` otherwise)."""
    full = os.path.expanduser(path)
    if not os.path.isdir(full):
        raise FileNotFoundError(f"{what} path {path!r} does not exist or is not a directory. Pass a hub id "
                                f"(owner/name) or a local copy (e.g. made by `hf download <id> --local-dir DIR`).")
    missing = [s for s in subfolders if not os.path.isdir(os.path.join(full, s))]
    if missing:
        raise FileNotFoundError(f"{what} directory {path!r} lacks the subfolders {missing}; it must be in the "
                                f"diffusers layout ({', '.join(subfolders)})")
    return full


def load_error(what: str, source: str, err: Exception) -> OSError:
    """The error for a model that could not be loaded, saying how to use a local copy."""
    return OSError(f"could not load {what} from {source!r}: {err}\n"
                   f"Without internet access, download it on a machine that has it "
                   f"(`hf download <id> --local-dir DIR`), copy DIR here and pass its path instead of the hub id, "
                   f"or set HF_HOME to a cache that holds it (and HF_HUB_OFFLINE=1).")
