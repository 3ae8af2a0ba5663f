"""The estimators e9 measures: the sweeps of each setting, and the field's recipes written as
halforder samplers and options (docs/field-estimators.md), with the command line of each."""
from __future__ import annotations

from dataclasses import dataclass

from halforder.estimators import FAMILIES, make_sampler
from halforder.estimators.baselines import GroupNormalised, LeaveOneOut

B = 48
GROUPS = (2, 4, 8, 16, 24)
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
WINDOWS = (1, 2, 4)
CLIPS = (1e-4, 1e-2, 0.2, None)
UPDATES = (1, 2, 4)
BETAS = (0.0, 0.01, 0.04)


@dataclass(frozen=True)
class Spec:
    """One estimator: its family and settings (as ``make_sampler`` takes them), advantage,
    prompt groups, and the clipped-ratio options; ``sweep`` and ``label`` name its row."""

    sweep: str
    label: str
    family: str = "reinforce"
    settings: tuple = ()
    advantage: object = LeaveOneOut()
    G: int | None = None
    prompts: bool = False
    clip: float | None = None
    U: int = 1
    beta: float = 0.0

    def sampler(self, T: int):
        """Its plan sampler on T steps."""
        return make_sampler(self.family, T, **dict(self.settings))

    @property
    def clipped(self) -> bool:
        """Whether it runs through the clipped surrogate on a recorded rollout."""
        return self.clip is not None or self.U > 1 or self.beta > 0

    def flags(self) -> str:
        """The command line that trains with it."""
        s = [f"--estimator {self.family}"]
        for k, v in self.settings:
            v = " ".join(map(str, v)) if isinstance(v, tuple) else v
            s.append(f"--{k.replace('_', '-')} {v}")
        a = self.advantage
        if FAMILIES[self.family].reward_gradient:
            a = "pathwise"                       # no likelihood-ratio term: no advantage
        if a is None:
            s.append("--baseline none")
        elif a != "pathwise":
            s.append("--baseline " + ("loo" if isinstance(a, LeaveOneOut) else "grpo"))
            s += [f"--group-size {a.group_size}"] if a.group_size else []
            s += ["--global-std"] if isinstance(a, GroupNormalised) and a.std == "global" else []
        s += [f"--clip-range {self.clip:g}"] if self.clip is not None else []
        s += [f"--updates-per-rollout {self.U}"] if self.U > 1 else []
        s += [f"--kl-beta {self.beta:g}"] if self.beta else []
        return " ".join(s)


def specs(T: int, linear: bool) -> list[Spec]:
    """Every estimator measured on a chain of T steps (the prompts and KL sweeps on the linear chain only)."""
    out = []
    for prompts in (False, True) if linear else (False,):
        sweep = "prompts" if prompts else "group"
        for G in GROUPS:
            out += [Spec(sweep, "per-prompt LOO", advantage=LeaveOneOut(G), G=G, prompts=prompts),
                    Spec(sweep, "GRPO", advantage=GroupNormalised(G), G=G, prompts=prompts),
                    Spec(sweep, "GRPO, global std", advantage=GroupNormalised(G, "global"), G=G, prompts=prompts)]
            if prompts:
                out += [Spec(sweep, "batch LOO", G=G, prompts=True),
                        Spec(sweep, "no baseline", advantage=None, G=G, prompts=True)]
        if not prompts:
            out += [Spec(sweep, "batch LOO"), Spec(sweep, "no baseline", advantage=None)]
    for f in FRACTIONS:
        for w in ("unbiased", "field") if f < 1 else ("unbiased",):
            out.append(Spec("fraction", f"fraction {f:g}, {w}", settings=(("step_fraction", f), ("step_weighting", w))))
    for L in (L for L in WINDOWS if L < T):
        for pos in ("random", "sliding"):
            for w in ("unbiased", "field"):
                out.append(Spec("window", f"window {L}, {pos}, {w}", settings=(
                    ("window_length", L), ("window_position", pos), ("step_weighting", w))))
    for U in UPDATES:
        for clip in CLIPS:
            out.append(Spec("clip", f"clip {'none' if clip is None else f'{clip:g}'}, U={U}", clip=clip, U=U))
    if linear:
        for U in (1, 2):
            for beta in BETAS:
                out.append(Spec("kl", f"beta {beta:g}, U={U}", beta=beta, U=U))
    return out + recipes(T, linear)


def recipes(T: int, linear: bool) -> list[Spec]:
    """The field's systems at T steps (docs/field-estimators.md), and halforder's unbiased forms;
    on the multi-prompt variant on the linear chain. U = 1 rows leave the clip range out: on the
    update that samples, the ratio is 1 and clipping does nothing."""
    kw = dict(sweep="recipe", prompts=linear)
    late = (T // 2 + 1, T)
    return [
        Spec(label="DDPO", advantage=GroupNormalised(16), G=16, **kw),
        Spec(label="Flow-GRPO", settings=(("reinforce_window", (2, T)),), advantage=GroupNormalised(24, "global"),
             G=24, **kw),
        Spec(label="Flow-GRPO, 2nd update", settings=(("reinforce_window", (2, T)),), clip=1e-4, U=2,
             beta=0.04 if linear else 0.0, advantage=GroupNormalised(24, "global"), G=24, **kw),
        Spec(label="Flow-GRPO-Fast", settings=(("reinforce_window", late), ("window_length", 2),
                                               ("window_position", "random"), ("step_weighting", "field")),
             advantage=GroupNormalised(24, "global"), G=24, **kw),
        Spec(label="DanceGRPO", settings=(("step_fraction", 0.6), ("step_weighting", "field")),
             advantage=GroupNormalised(12), G=12, **kw),
        Spec(label="MixGRPO", settings=(("window_length", T // 2), ("window_position", "sliding"),
                                        ("step_weighting", "field")), advantage=GroupNormalised(12), G=12, **kw),
        Spec(label="AlignProp", family="truncated_random", settings=(("k", T), ("step_weighting", "field")), **kw),
        Spec(label="DRaFT-1", family="truncated", settings=(("k", 1),), **kw),
        Spec(label="halforder: REINFORCE, per-prompt LOO", advantage=LeaveOneOut(12), G=12, **kw),
        Spec(label="halforder: fraction 0.5, weighted", settings=(("step_fraction", 0.5), ("step_weighting", "unbiased")),
             advantage=LeaveOneOut(12), G=12, **kw),
        Spec(label="halforder: Russian roulette", family="truncated_random",
             settings=(("k", T), ("step_weighting", "unbiased")), **kw),
        Spec(label="halforder: full backprop", family="full", **kw),
    ]


def sd3_specs(T: int, quick: bool) -> list[Spec]:
    """The estimators run on tiny SD3: those of the tanh chain, the clip ranges at U = 2 only
    (each costs a surrogate pass; U = 1 is REINFORCE) (--quick: three)."""
    keep = [s for s in specs(T, False) if s.sweep != "clip" or s.U == 2]
    if quick:
        return [keep[0], next(s for s in keep if s.family == "truncated"), next(s for s in keep if s.clipped)]
    return keep
