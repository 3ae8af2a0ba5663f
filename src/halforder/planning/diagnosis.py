"""Which steps carry the gradient, and how large a batch and a group must be: statistics of
per-sample, per-step terms (docs/why-my-reward-does-not-rise.md).

**Per step.** With h_{n,t} the term of step t for sample n (the pathwise g_t, or the
likelihood-ratio term A_n S_{n,t}) and m_t = E h_t, the whole gradient is m = sum_t m_t and
step t carries the share <m_t, m> / |m|^2 of the signal |m|^2 (the shares add up to 1; a
negative share works against the rest). Inner products of means are estimated without bias
by U-statistics, sum_{n != n'} <x_n, y_n'> / (N (N - 1)), so that noise does not pass for signal.

**Batch and group size.** One observation is the mean estimate of one prompt's group of G
samples (its advantage taken within the group), so observations are i.i.d. A batch of B
samples averages B / G of them, and its cosine with the true gradient m is

    cos(B) = <mu, m> / (|m| sqrt(|mu|^2 + tr Sigma_G G / B))

with mu and Sigma_G the observations' mean and covariance (mu = m for an unbiased
estimator; a biased one, such as GRPO's normalised advantage, has mu != m and a cosine that
stays below 1 at any B). m comes from an unbiased estimator on the same rows (leave-one-out
within the groups, or full backprop). Intervals are percentile intervals of a bootstrap over
observations, computed from their Gram matrices (no copy of the P-dimensional rows).

A random set of steps is drawn here once per observation, while training draws one set per
update for the whole batch; the variance between sets that a batch then carries is left out,
so for random sets (AlignProp's truncation, step fractions, windows) the predicted cosine is
optimistic (docs/why-my-reward-does-not-rise.md gives the measured gap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def unbiased_dot(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """<E x, E y> from paired rows ``X``, ``Y`` ``[K, P]``, without the noise term: the
    U-statistic sum_{k != l} <x_k, y_l> / (K (K - 1)); with bootstrap counts ``w`` ``[R, K]``,
    one value per replicate (the same statistic over the resampled rows)."""
    G = X.double() @ Y.double().T
    if w is None:
        K = X.shape[0]
        return (G.sum() - G.diagonal().sum()) / (K * (K - 1))
    w = w.double()
    n = w.sum(1)
    return (torch.einsum("rk,kl,rl->r", w, G, w) - (w * w * G.diagonal()).sum(1)) / (n * n - (w * w).sum(1))


def trace_covariance(X: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """tr Cov(x) from rows ``X`` ``[K, P]`` (the unbiased estimate); per replicate with counts ``w``."""
    G = X.double() @ X.double().T
    if w is None:
        K = X.shape[0]
        return (G.diagonal().sum() - G.sum() / K) / (K - 1)
    w = w.double()
    n = w.sum(1)
    return ((w * G.diagonal()).sum(1) - torch.einsum("rk,kl,rl->r", w, G, w) / n) / (n - 1)


@dataclass(frozen=True)
class StepShares:
    """Per step t (``[t-1]``): ``share`` of the signal |m|^2, ``cosine`` of m_t with m, ``spread``
    tr Cov(h_t) per sample, and ``signal`` the estimate of |m|^2."""

    share: tuple[float, ...]
    cosine: tuple[float, ...]
    spread: tuple[float, ...]
    signal: float

    def suggest(self, keep: float = 0.9) -> dict:
        """The fewest steps whose shares add up to ``keep`` of the signal, and the shortest
        window (consecutive steps) that does, as ``{"steps": [...], "window": [a, b]}``."""
        T, order = len(self.share), sorted(range(len(self.share)), key=lambda i: -self.share[i])
        steps, total = [], 0.0
        for i in order:
            if total >= keep:
                break
            steps.append(i + 1)
            total += self.share[i]
        best = None
        for length in range(1, T + 1):
            for a in range(1, T - length + 2):
                s = sum(self.share[a - 1:a - 1 + length])
                if s >= keep and (best is None or s > best[2]):
                    best = (a, a + length - 1, s)
            if best is not None:
                break
        return {"steps": sorted(steps), "window": None if best is None else [best[0], best[1]]}


def step_shares(H: torch.Tensor) -> StepShares:
    """:class:`StepShares` from per-sample, per-step terms ``H`` ``[N, T, P]``."""
    N, T, _ = H.shape
    H = H.double()
    g = H.sum(1)
    signal = float(unbiased_dot(g, g))
    share, cosine, spread = [], [], []
    for t in range(T):
        h = H[:, t]
        inner, own = float(unbiased_dot(h, g)), float(unbiased_dot(h, h))
        share.append(inner / signal if signal > 0 else math.nan)
        cosine.append(inner / math.sqrt(own * signal) if own > 0 and signal > 0 else math.nan)
        spread.append(float(trace_covariance(h)))
    return StepShares(tuple(share), tuple(cosine), tuple(spread), signal)


@dataclass(frozen=True)
class BatchCurve:
    """cos(B) of one estimator at group size ``group``: its statistics (``dot`` = <mu, m>,
    ``truth`` = |m|^2, ``own`` = |mu|^2, ``spread`` = tr Sigma_G per observation) and their
    bootstrap replicates (``boot``: a ``[R, 4]`` tensor in that order)."""

    name: str
    group: int
    dot: float
    truth: float
    own: float
    spread: float
    boot: torch.Tensor

    def cosine(self, B: int) -> float:
        """The expected cosine of a batch of B samples with the true gradient (module docstring)."""
        return _cos(self.dot, self.truth, self.own, self.spread, self.group, B)

    def interval(self, B: int, level: float = 0.95) -> tuple[float, float]:
        """A bootstrap percentile interval of :meth:`cosine` at level ``level``. A replicate in
        which the gradient's signal |m|^2 is not positive (not resolved) counts as cosine 0,
        so that an unresolved gradient widens the interval towards 0 instead of leaving it."""
        d, t, o, s = self.boot.unbind(1)
        vals = torch.tensor([_cos(*map(float, v), self.group, B) for v in zip(d, t, o, s)])
        vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
        q = torch.quantile(vals.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
        return float(q[0]), float(q[1])

    @property
    def limit(self) -> float:
        """cos(B) as B grows: 1 for an unbiased estimator, <mu, m> / (|mu| |m|) for a biased one."""
        return self.dot / math.sqrt(self.truth * self.own) if self.truth > 0 and self.own > 0 else math.nan

    def smallest_batch(self, target: float) -> int | None:
        """The smallest multiple of the group size whose cosine reaches ``target`` (None where
        the limit stays below it)."""
        if not self.truth > 0 or not self.dot > 0:
            return None
        need = (self.dot ** 2 / (self.truth * target ** 2)) - self.own
        if need <= 0:
            return None
        B = self.spread * self.group / need
        return self.group * max(1, math.ceil(B / self.group - 1e-12))


def _cos(dot, truth, own, spread, group, B) -> float:
    denom = own + spread * group / B
    if not (truth > 0 and denom > 0):
        return math.nan
    return dot / math.sqrt(truth * denom)


def batch_curve(name: str, X: torch.Tensor, Y: torch.Tensor, group: int, *, replicates: int = 200,
                generator: torch.Generator | None = None) -> BatchCurve:
    """:class:`BatchCurve` from observations ``X`` (the estimator's group means, ``[K, P]``) and
    ``Y`` (an unbiased estimator's on the same rows), with ``replicates`` bootstrap draws."""
    K = X.shape[0]
    if K < 3:
        raise ValueError(f"a batch curve needs at least 3 observations (groups), got {K}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    idx = torch.randint(K, (replicates, K), generator=generator)
    w = torch.zeros((replicates, K), dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    stats = [unbiased_dot(X, Y), unbiased_dot(Y, Y), unbiased_dot(X, X), trace_covariance(X)]
    boot = torch.stack([unbiased_dot(X, Y, w), unbiased_dot(Y, Y, w), unbiased_dot(X, X, w),
                        trace_covariance(X, w)], 1)
    return BatchCurve(name, group, *map(float, stats), boot)


def group_means(rows: torch.Tensor, group: int) -> torch.Tensor:
    """``[N, P]`` rows in consecutive groups of ``group`` -> their means ``[N / group, P]``."""
    N = rows.shape[0]
    if N % group:
        raise ValueError(f"{N} rows do not split into groups of {group}")
    return rows.reshape(N // group, group, -1).mean(1)
