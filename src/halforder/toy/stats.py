"""Tests of per-sample estimates' mean against the truth.

``mean_test`` is Hotelling's T^2 test that the mean of i.i.d. rows equals a given vector;
``two_sample_test`` compares the means of two samples; ``reference_gradient`` is a
high-sample full-backprop estimate for chains without an exact gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

from ..estimators import Plan, draw_estimates


def reference_gradient(chain, params, n: int, *, generator: torch.Generator, chunk: int = 1 << 14):
    """High-sample full-backprop estimate of grad J and its standard errors (flattened)."""
    s = draw_estimates(chain, Plan.full(chain.T), params, n, generator=generator, chunk=chunk)
    return s.grad.mean(0), s.grad.std(0) / n ** 0.5


@dataclass(frozen=True)
class MeanTest:
    """Result of :func:`mean_test`. ``z`` are the per-coordinate z-scores."""

    statistic: float
    dof: int
    pvalue: float
    z: np.ndarray
    n: int

    def rejects(self, alpha: float) -> bool:
        return self.pvalue < alpha


def mean_test(samples: torch.Tensor, truth: torch.Tensor) -> MeanTest:
    """Hotelling's T^2 test of H0: E[samples] = truth, for i.i.d. rows of ``samples`` [n, P].

    T^2 = n d^T S^+ d over the rank-r support of the sample covariance S; under H0,
    T^2 (n - r) / (r (n - 1)) ~ F(r, n - r). Coordinates with zero sample variance
    must match exactly (up to float rounding), or the p-value is 0."""
    x = samples.double().cpu().numpy()
    n, P = x.shape
    diff = x.mean(0) - truth.double().cpu().numpy().reshape(-1)
    S = np.cov(x, rowvar=False).reshape(P, P)
    evals, evecs = np.linalg.eigh(S)
    keep = evals > evals.max() * 1e-12 if evals.max() > 0 else np.zeros(P, bool)
    r = int(keep.sum())
    proj = evecs[:, keep].T @ diff
    t2 = float(n * np.sum(proj ** 2 / evals[keep])) if r else 0.0
    resid = diff - evecs[:, keep] @ proj
    scale = max(1.0, float(np.abs(x).max()))
    if np.abs(resid).max() > 1e-9 * scale:
        pvalue = 0.0
    else:
        pvalue = float(sps.f.sf(t2 * (n - r) / (r * (n - 1)), r, n - r)) if r else 1.0
    sd = np.sqrt(np.maximum(np.diag(S), 0.0) / n)
    z = np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 0)
    return MeanTest(t2, r, pvalue, z, n)


def two_sample_test(a: torch.Tensor, b: torch.Tensor) -> MeanTest:
    """Large-sample test of H0: E[a] = E[b] for independent i.i.d. samples a [n, P], b [m, P]
    with unequal covariances: d^T (S_a/n + S_b/m)^+ d ~ chi^2(r) under H0 (r its rank).
    ``z`` are the per-coordinate Welch z-scores; ``n`` is min(n, m)."""
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    diff = x.mean(0) - y.mean(0)
    P = diff.shape[0]
    S = (np.cov(x, rowvar=False).reshape(P, P) / x.shape[0] + np.cov(y, rowvar=False).reshape(P, P) / y.shape[0])
    evals, evecs = np.linalg.eigh(S)
    keep = evals > evals.max() * 1e-12 if evals.max() > 0 else np.zeros(P, bool)
    r = int(keep.sum())
    proj = evecs[:, keep].T @ diff
    t2 = float(np.sum(proj ** 2 / evals[keep])) if r else 0.0
    pvalue = float(sps.chi2.sf(t2, r)) if r else float(np.allclose(diff, 0.0))
    sd = np.sqrt(np.maximum(np.diag(S), 0.0))
    z = np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 0)
    return MeanTest(t2, r, pvalue, z, min(x.shape[0], y.shape[0]))
