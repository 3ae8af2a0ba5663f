"""Advantages for the likelihood-ratio (HO and ZO) terms: R minus a baseline, or GRPO's
normalised form, over the whole batch or within per-prompt groups.

A baseline b_n subtracted from R_n keeps E[(R_n - b_n) * score_n] = grad J exactly when
b_n does not depend on sample n's noise, because E[score_n] = 0.

Prompt groups (Flow-GRPO, DanceGRPO): a batch of P prompts x G samples holds each prompt's
G samples as consecutive rows. :class:`LeaveOneOut` with ``group_size=G`` leaves n out of the
mean over its own prompt's group; it stays unbiased, since the other members of the group
are drawn independently of n's noise (for the same prompt).

:class:`GroupNormalised` is not a baseline: it replaces R_n by GRPO's advantage
(R_n - mean) / (std + eps), the mean over n's group including R_n itself and the std over
the group (or, with ``std="global"``, over the batch, as Flow-GRPO's SD3.5 configs do).
The mean that includes R_n and the division that rescales each group differently bias the
estimate; it is what Flow-GRPO and DanceGRPO train with. The std is the population std
(numpy's ``np.std``, as Flow-GRPO's per-prompt statistics use).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


def leave_one_out(R: torch.Tensor, group: int = 1, group_size: int | None = None) -> torch.Tensor:
    """b_n = the mean of R over the samples outside n's antithetic group of ``group``
    consecutive samples (``group=1``: every m != n), within n's prompt group of
    ``group_size`` consecutive samples (None: the whole batch).

    Antithetic groups are independent of each other, so b_n does not depend on sample n's
    noise; the other members of n's antithetic group share that noise (pairing,
    :mod:`~halforder.estimators.pairing`) and must be left out too. Needs two antithetic
    groups in each prompt group."""
    N = R.shape[0]
    size = N if group_size is None else group_size
    if N % size:
        raise ValueError(f"{N} samples do not split into prompt groups of {size}")
    if size % group:
        raise ValueError(f"prompt groups of {size} samples do not split into antithetic groups of {group}")
    if size < 2 * group:
        raise ValueError(f"the leave-one-out baseline needs at least 2 groups of {group} in "
                         f"{'the batch' if group_size is None else 'each prompt group'}, got {size} samples")
    own = R.reshape(N // group, group).sum(1, keepdim=True).expand(N // group, group).reshape(N // size, size)
    total = R.reshape(N // size, size).sum(1, keepdim=True)
    return ((total - own) / (size - group)).reshape(N)


def normalised_advantage(R: torch.Tensor, eps: float = 1e-4, group_size: int | None = None,
                         std: str = "group") -> torch.Tensor:
    """GRPO's advantage (R_n - mean) / (std + eps), with mean and std over n's prompt group of
    ``group_size`` consecutive samples (None: the batch); ``std="global"`` takes the std over
    the batch instead (biased: module docstring)."""
    N = R.shape[0]
    size = N if group_size is None else group_size
    if N % size:
        raise ValueError(f"{N} samples do not split into prompt groups of {size}")
    if size < 2:
        raise ValueError("the normalised advantage needs at least 2 samples in each group")
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    rows = R.reshape(N // size, size)
    spread = rows.std(1, correction=0, keepdim=True) if std == "group" else R.std(correction=0)
    return ((rows - rows.mean(1, keepdim=True)) / (spread + eps)).reshape(N)


@dataclass(frozen=True)
class LeaveOneOut:
    """R - b with b the leave-one-out mean (:func:`leave_one_out`) within prompt groups of
    ``group_size`` (None: the batch). Unbiased."""

    group_size: int | None = None

    def __call__(self, R: torch.Tensor, antithetic: int = 1) -> torch.Tensor:
        return R - leave_one_out(R, antithetic, self.group_size)


@dataclass(frozen=True)
class GroupNormalised:
    """GRPO's normalised advantage (:func:`normalised_advantage`) within prompt groups of
    ``group_size`` (None: the batch), with the std of the ``"group"`` or of the ``"global"``
    batch. Biased."""

    group_size: int | None = None
    std: str = "group"
    eps: float = 1e-4

    def __call__(self, R: torch.Tensor, antithetic: int = 1) -> torch.Tensor:
        return normalised_advantage(R, self.eps, self.group_size, self.std)


Advantage = Union[LeaveOneOut, GroupNormalised]
Baseline = Union[None, str, float, torch.Tensor, LeaveOneOut, GroupNormalised]

#: The names a run's ``baseline`` setting takes (:func:`named_baseline`).
BASELINES = ("loo", "none", "grpo")


def named_baseline(name: str) -> str | None:
    """The baseline a run's ``baseline`` setting names, as :func:`advantage` takes it: None
    for ``"none"`` (no baseline), the name itself for ``"loo"`` and ``"grpo"``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    return None if name == "none" else name


def advantage(R: torch.Tensor, baseline: Baseline, antithetic: int = 1) -> torch.Tensor:
    """The weights of the likelihood-ratio terms for rewards ``R`` (detached): R - b for
    ``baseline`` None, a number, a tensor of shape [N] that does not depend on this batch's
    noise, ``"loo"`` or a :class:`LeaveOneOut`; GRPO's advantage for ``"grpo"`` or a
    :class:`GroupNormalised`. ``antithetic`` is the pairing's group size G."""
    if callable(baseline):
        return baseline(R, antithetic)
    if baseline is None:
        return R
    if isinstance(baseline, str):
        named = {"loo": LeaveOneOut(), "grpo": GroupNormalised()}
        if baseline not in named:
            raise ValueError(f"unknown baseline {baseline!r}; use None, a number, a tensor, 'loo' or 'grpo'")
        return named[baseline](R, antithetic)
    b = torch.as_tensor(baseline, dtype=R.dtype, device=R.device)
    if b.dim() not in (0, 1) or (b.dim() == 1 and b.shape != R.shape):
        raise ValueError(f"a baseline tensor must be a scalar or have shape {tuple(R.shape)}")
    return R - b.expand_as(R)
