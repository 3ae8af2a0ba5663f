"""Loading from the Hugging Face hub or a local directory, and the one message for when
that fails offline.

Every loader asks :func:`offline` whether it may touch the network (not with
``HF_HUB_OFFLINE=1``, nor where the hub cannot be reached: one short probe, instead of the
hub client's retries, which take most of a minute), :func:`looks_local` whether a name is a
path, :func:`local_dir` whether such a path holds what it needs, and raises
:func:`load_error` when loading fails.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Sequence

_TRUE = ("1", "on", "true", "yes")
PROBE_TIMEOUT_S = 3.0
_probed: dict[str, str | None] = {}


def offline() -> bool:
    """Whether loaders must use local files only: ``HF_HUB_OFFLINE`` is set (read now, not at
    import), or the hub cannot be reached (:func:`unreachable`)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE or unreachable() is not None


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT``, or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def unreachable() -> str | None:
    """None where the hub answers, else why it does not; asked once per process and endpoint,
    within about :data:`PROBE_TIMEOUT_S` seconds (through the proxies the environment sets)."""
    url = endpoint()
    if url not in _probed:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            _probed[url] = None
        except urllib.error.HTTPError:              # it answered, if only with an error status
            _probed[url] = None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            _probed[url] = f"the hub at {url} cannot be reached ({' '.join(str(reason).split())})"
    return _probed[url]


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
    """The error for a model that could not be loaded from ``source`` (one or more names joined by
    `` + ``), in one line, saying how to use a local copy; where the hub cannot be reached, that
    is the reason it gives for the hub ids among them."""
    hub_ids = [p for p in source.split(" + ") if not looks_local(p) and not os.path.isfile(p)]
    down = (isinstance(err, OSError) and hub_ids and os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in _TRUE
            and unreachable())
    why = (f"{down}, and {' and '.join(hub_ids)} {'is' if len(hub_ids) == 1 else 'are'} not in the local cache"
           if down else " ".join(str(err).split()))
    return OSError(f"could not load {what} from {source!r}: {why}. Without internet access, download it on a "
                   f"machine that has it (`hf download <id> --local-dir DIR`), copy DIR here and pass its path "
                   f"instead of the hub id, or set HF_HOME to a cache that holds it (and HF_HUB_OFFLINE=1).")
