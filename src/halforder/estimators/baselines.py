"""Control variates for the likelihood-ratio (HO and ZO) terms.

A baseline b_n subtracted from R_n keeps E[(R_n - b_n) * score_n] = grad J exactly when
b_n does not depend on sample n's noise, because E[score_n] = 0.

:func:`normalised_advantage` is not a baseline: it replaces R_n by GRPO's advantage
(R_n - mean R) / std R, where the mean includes R_n itself and the division rescales each
batch differently, so its estimate is biased (what Flow-GRPO and DanceGRPO train with).
"""
from __future__ import annotations

import torch


def leave_one_out(R: torch.Tensor, group: int = 1) -> torch.Tensor:
    """b_n = the mean of R over the samples outside n's group of ``group`` consecutive
    samples (``group=1``: every m != n).

    Groups are independent of each other, so b_n does not depend on sample n's noise;
    the other members of n's group share that noise (antithetic pairing,
    :mod:`~halforder.estimators.pairing`) and must be left out too. Needs two groups."""
    N = R.shape[0]
    if N % group:
        raise ValueError(f"{N} samples do not split into groups of {group}")
    if N < 2 * group:
        raise ValueError(f"the leave-one-out baseline needs at least 2 groups of {group} in the batch, got {N} "
                         f"samples")
    own = R.reshape(N // group, group).sum(1, keepdim=True).expand(N // group, group).reshape(N)
    return (R.sum(0, keepdim=True) - own) / (N - group)


def normalised_advantage(R: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage (R_n - mean R) / (std R + eps) over the batch (biased: module docstring).
    Flow-GRPO takes the mean and std over the samples of one prompt; here the batch is the group."""
    if R.shape[0] < 2:
        raise ValueError("the normalised advantage needs at least 2 samples in the batch")
    return (R - R.mean()) / (R.std() + eps)
