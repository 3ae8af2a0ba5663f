"""Control variates for the likelihood-ratio (HO and ZO) terms.

A baseline b_n subtracted from R_n keeps E[(R_n - b_n) * score_n] = grad J exactly when
b_n does not depend on sample n's noise, because E[score_n] = 0.
"""
from __future__ import annotations

import torch


def leave_one_out(R: torch.Tensor) -> torch.Tensor:
    """b_n = mean of R_m over m != n (the batch is i.i.d., so b_n is independent of
    sample n's noise). Needs at least two samples."""
    N = R.shape[0]
    if N < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples in the batch")
    return (R.sum(0, keepdim=True) - R) / (N - 1)
