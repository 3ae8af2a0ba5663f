"""Diffusive Chain-of-Thought (DCoT, sec. 5.3 and App. F of the paper).

A diffusion sampler works coarse to fine: the steps next to the noise lay out the rough
outline, the middle ones the geometric structure, the last ones the fine detail. DCoT

1. rewrites each prompt into a coarse, a mid and a fine version and conditions each of
   three consecutive step groups on its level's version (:class:`StepSplit`,
   :class:`DCoTConditioning`);
2. draws the HO block's start j of RLR from a window [a, b] over the steps where the
   generation is deficient (:class:`~halforder.estimators.samplers.WindowRLR`; the
   paper's hand task: a = 30, b = 40 of T = 50, with b - a > h).

Step numbering is the chain's: step t = T is the first one generated (from
pure noise), t = 1 the last. The coarse group is t = T..T-n_c+1, the mid group the next
n_m steps, the fine group the last n_f steps (down to t = 1).

Prompt files (YAML or JSON) hold a list of entries with an original prompt and its three
levels; ``data/dcot_hands.yaml`` has the paper's hand prompts::

    prompts:
      - prompt: A realistic open palm facing upward
        coarse: A single human hand positioned with the palm facing upward
        mid: An open palm with fingers naturally spread and relaxed, oriented upward
        fine: Detailed skin texture, visible creases on the palm, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ...training.config import read_mapping_file

LEVELS = ("coarse", "mid", "fine")
_KEYS = ("prompt",) + LEVELS
# Top-level keys of a prompt file; all but "prompts" are documentation, ignored by the loader.
_TOP_KEYS = {"prompts", "source", "notes", "originals_without_levels"}
#: The paper's window for the hand task (T = 50 DDIM steps, h = 2).
PAPER_WINDOW = (30, 40)


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class DCoTPrompt:
    """An original prompt and its coarse, mid and fine versions."""

    prompt: str
    coarse: str
    mid: str
    fine: str

    def level(self, name: str) -> str:
        if name not in LEVELS:
            raise ValueError(f"unknown DCoT level {name!r}; use one of {LEVELS}")
        return getattr(self, name)


def parse_dcot_prompts(data, source: str = "<data>") -> tuple[DCoTPrompt, ...]:
    """Entries from parsed YAML/JSON: a mapping with key ``prompts`` (or a bare list) of
    mappings with the string keys ``prompt``, ``coarse``, ``mid``, ``fine``."""
    entries = data.get("prompts") if isinstance(data, Mapping) else data
    unknown = sorted(set(data) - _TOP_KEYS) if isinstance(data, Mapping) else []
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {unknown}; known: {sorted(_TOP_KEYS)}")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: needs a non-empty list of prompts (key 'prompts')")
    out, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise ValueError(f"{source}: entry {i} must be a mapping with keys {', '.join(_KEYS)}")
        missing = [k for k in _KEYS if not isinstance(e.get(k), str) or not e[k].strip()]
        extra = sorted(set(e) - set(_KEYS))
        if missing or extra:
            raise ValueError(f"{source}: entry {i} " + (f"lacks non-empty strings for {missing}" if missing else "")
                             + ("; " if missing and extra else "") + (f"has unknown keys {extra}" if extra else ""))
        p = DCoTPrompt(*(e[k].strip() for k in _KEYS))
        if p.prompt in seen:
            raise ValueError(f"{source}: prompt {p.prompt!r} appears twice")
        seen.add(p.prompt)
        out.append(p)
    return tuple(out)


def load_dcot_prompts(path: str) -> tuple[DCoTPrompt, ...]:
    """Read a DCoT prompt file (``.yaml``/``.yml``, ``.toml`` or ``.json``); ValueError on a bad file."""
    return parse_dcot_prompts(read_mapping_file(path, "DCoT prompt file", allow_list=True), path)


# ----------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class StepSplit:
    """The T steps in three consecutive groups, in generation order: ``coarse`` steps from
    the noise (t = T downwards), then ``mid``, then ``fine`` (ending at t = 1)."""

    coarse: int
    mid: int
    fine: int

    def __post_init__(self):
        for name in LEVELS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"the DCoT split needs at least one step per group; {name} = {v!r}")

    @property
    def T(self) -> int:
        return self.coarse + self.mid + self.fine

    @classmethod
    def make(cls, T: int, split: Sequence[float] | None = None) -> "StepSplit":
        """The split of ``T`` steps: None (thirds; the remainder goes to coarse, then mid),
        three step counts summing to T, or three positive fractions summing to 1 (rounded
        to counts by largest remainder)."""
        if not isinstance(T, int) or T < 3:
            raise ValueError(f"DCoT needs T >= 3 steps (one per group), got T={T!r}")
        if split is None:
            q, r = divmod(T, 3)
            return cls(q + (r > 0), q + (r > 1), q)
        s = list(split)
        if len(s) != 3:
            raise ValueError(f"the DCoT split needs 3 values (coarse, mid, fine), got {s}")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()
               for v in s):  # step counts (a config may give them as floats: 17.0)
            if sum(s) != T:
                raise ValueError(f"the DCoT split {s} covers {sum(s)} steps, but T = {T}")
            return cls(*(int(v) for v in s))
        if any(not isinstance(v, (int, float)) or not v > 0 for v in s) or abs(sum(s) - 1) > 1e-9:
            raise ValueError(f"the DCoT split {s} must be 3 step counts summing to T={T} "
                             "or 3 positive fractions summing to 1")
        raw = [v * T for v in s]
        counts = [int(x) for x in raw]
        for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[:T - sum(counts)]:
            counts[i] += 1
        return cls(*counts)

    def level(self, t: int) -> str:
        """The group of step t (1 <= t <= T)."""
        if not 1 <= t <= self.T:
            raise ValueError(f"step {t} is outside 1..{self.T}")
        if t > self.mid + self.fine:
            return "coarse"
        return "mid" if t > self.fine else "fine"

    def steps(self, level: str) -> range:
        """The steps t of a group, as a range (ascending)."""
        lo = {"coarse": self.mid + self.fine + 1, "mid": self.fine + 1, "fine": 1}[level]
        hi = {"coarse": self.T, "mid": self.mid + self.fine, "fine": self.fine}[level]
        return range(lo, hi + 1)


# ----------------------------------------------------------------------------- conditioning
@dataclass(frozen=True)
class DCoTConditioning:
    """Maps a batch of original prompts to the per-step prompts of DCoT.

    ``conditioning(batch)`` is a callable ``t -> prompts`` (level of step t for every prompt
    of the batch): the ``step_prompts`` of a :class:`~halforder.diffusion.app.task.DiffusionTask`."""

    prompts: tuple[DCoTPrompt, ...]
    split: StepSplit
    _table: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_table", {p.prompt: p for p in self.prompts})

    @property
    def originals(self) -> list[str]:
        """The original prompts (the trainer's prompt list)."""
        return [p.prompt for p in self.prompts]

    def entry(self, prompt: str) -> DCoTPrompt:
        if prompt not in self._table:
            raise ValueError(f"prompt {prompt!r} has no DCoT levels; known: {self.originals[:3]}...")
        return self._table[prompt]

    def __call__(self, batch: Sequence[str]) -> Callable[[int], list[str]]:
        entries = [self.entry(p) for p in batch]
        split = self.split

        def at(t: int) -> list[str]:
            level = split.level(t)
            return [e.level(level) for e in entries]
        return at


# ----------------------------------------------------------------------------- the window
def window_levels(split: StepSplit, h: int, a: int, b: int) -> tuple[str, ...]:
    """The DCoT groups that the HO blocks of the window [a, b] can touch (steps a..b+h-1)."""
    return tuple(lv for lv in LEVELS if set(split.steps(lv)) & set(range(a, b + h)))
