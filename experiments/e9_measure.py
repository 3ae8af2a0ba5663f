"""How e9 measures the field's estimators: per-step terms on common noise, estimates assembled
from them, the clipped surrogate on recorded rollouts, summaries with intervals, and the
exact path KL of the linear-Gaussian chain.

A REINFORCE-like estimate (HO blocks of length 1 on a set S of steps, step weights w_t) is,
per sample, A_n sum_{t in S} w_t s_{n,t}, with s_{n,t} the gradient of
<phi_t(x_t; theta), eps_t> / sigma_t (the engine's HO term at advantage 1) and A_n the
advantage; a truncated-backprop estimate (FO on 1..K, weights w_t) is sum_{t <= K} w_t p_{n,t},
with p_{n,t} = grad_{theta_t} R(x_0). Both kinds of term come from two engine calls on a chain
whose every step has its own copy of the parameters (:class:`StepCopies`), on the same noise,
so every plan a sampler draws is assembled from them without another rollout.
:func:`engine_check` holds one batch of each estimator to the engine's own estimate of its
plan, advantage and reward on the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from halforder.estimators import ComputeMeter, Plan, Role, estimate, flatten
from halforder.estimators.baselines import advantage
from halforder.estimators.clipped_ratio import clipped_surrogate, record
from halforder.toy import mean_test, two_sample_test

from .common import Z95, trace_var


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


class _Wrapped:
    """A chain that delegates every member it does not define to ``chain``."""

    def __init__(self, chain):
        self.chain = chain

    def __getattr__(self, name):
        if name == "chain":
            raise AttributeError(name)
        return getattr(self.chain, name)


class StepCopies(_Wrapped):
    """``chain`` with its own copy of the parameters at every step, named ``"t:name"``: the
    gradient with respect to copy t is step t's term."""

    def step(self, t, x, params):
        pre = f"{t}:"
        return self.chain.step(t, x, {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)})


class Offset(_Wrapped):
    """``chain`` whose reward adds a per-row offset ``c`` (a prompt's reward level)."""

    def __init__(self, chain, c: torch.Tensor):
        super().__init__(chain)
        self.c = c

    def reward(self, x0):
        return self.chain.reward(x0) + self.c.to(x0.dtype)


@dataclass(frozen=True)
class Unit:
    """The advantage 1 for every sample: the engine's HO term is then the bare score gradient."""

    def __call__(self, R: torch.Tensor, antithetic: int = 1) -> torch.Tensor:
        return torch.ones_like(R)


@dataclass(frozen=True)
class PerBatch:
    """An advantage (a baseline value, :func:`~halforder.estimators.baselines.advantage`) taken
    within each batch of ``size`` consecutive rows on its own: one training step's batch."""

    inner: object
    size: int

    def __call__(self, R: torch.Tensor, antithetic: int = 1) -> torch.Tensor:
        return torch.cat([advantage(r, self.inner, antithetic) for r in R.split(self.size)])


@dataclass(frozen=True)
class StepTerms:
    """Per-sample terms on common noise: rewards ``[N]``, score terms s and pathwise terms p
    ``[N, T, P]`` (float64; module docstring)."""

    reward: torch.Tensor
    score: torch.Tensor
    path: torch.Tensor


def step_terms(chain, params, x_T, seed: int) -> StepTerms:
    """The per-step terms of the samples started at ``x_T``, noise drawn from ``seed``."""
    T, wrapped = chain.T, StepCopies(chain)
    copies = {f"{t}:{k}": v for t in range(1, T + 1) for k, v in params.items()}
    s = estimate(wrapped, Plan.reinforce(T), copies, x_T, generator=gen(seed), per_sample=True, baseline=Unit())
    p = estimate(wrapped, Plan.full(T), copies, x_T, generator=gen(seed), per_sample=True)
    if not torch.equal(s.reward, p.reward):
        raise RuntimeError("the two passes did not draw the same noise")
    split = (lambda g: torch.stack([flatten({k: g[f"{t}:{k}"] for k in params}, True) for t in range(1, T + 1)],
                                   1).double())
    return StepTerms(s.reward.double(), split(s.grad), split(p.grad))


def step_weights(plan: Plan) -> list[float]:
    """w_t for every step t: the plan's weight where the step has a role, 0 where it is NONE."""
    return [0.0 if r is Role.NONE else plan.weight(t) for t, r in enumerate(plan.roles, start=1)]


def path_kind(plan: Plan) -> bool:
    """Whether ``plan`` is truncated backprop (FO steps only) rather than single-step likelihood ratios."""
    if plan.steps(Role.ZO) or any(h != 1 for _, h in plan.blocks) or (plan.fo_steps and plan.blocks):
        raise ValueError(f"plan {plan} is neither truncated backprop nor REINFORCE on a set of steps")
    return plan.fo_steps > 0


def assemble(terms: StepTerms, weights: torch.Tensor, path: bool, A: torch.Tensor | None) -> torch.Tensor:
    """The batch means ``[b, P]`` of the estimates of b batches (consecutive rows), batch i with
    step weights ``weights[i]`` ``[b, T]`` and advantages ``A`` ``[N]`` (score terms only)."""
    x = terms.path if path else terms.score * A.double()[:, None, None]
    b, (N, T, P) = weights.shape[0], x.shape
    return torch.einsum("nbtp,nt->np", x.reshape(b, N // b, T, P), weights.double()) / (N // b)


def prompt_offsets(batches: int, batch: int, group: int, sd: float, generator: torch.Generator) -> torch.Tensor:
    """c for ``batches`` x ``batch`` rows: one N(0, sd^2) level per prompt, repeated over its
    ``group`` consecutive rows (zeros where sd = 0)."""
    c = sd * torch.randn((batches * batch // group,), generator=generator, dtype=torch.float64)
    return c.repeat_interleave(group)


def record_with(chain, plan: Plan, params, x_T, seed: int, adv, c: torch.Tensor):
    """A rollout recorded under ``params`` from ``x_T`` with the noise of ``seed`` (that of
    :func:`step_terms`), rewards offset by ``c`` and weighed by the advantage ``adv``."""
    return record(Offset(chain, c), plan, params, x_T, generator=gen(seed), baseline=adv)


def surrogate_rows(rec, params, batch: int, **kw) -> tuple[torch.Tensor, dict]:
    """Batch means ``[b, P]`` of the clipped surrogate's per-sample gradients at ``params``, and its stats."""
    est = clipped_surrogate(rec, params, per_sample=True, **kw)
    g = flatten(est.grad, True).double()
    return g.reshape(-1, batch, g.shape[1]).mean(1), est.stats


def evaluations(chain, sampler, params, n: int, draws: int, seed: int) -> float:
    """Evaluations per sample, counted by the compute meter, of the engine's estimate of the
    plans ``sampler`` draws (``draws`` updates on batches of n)."""
    g, state = gen(seed), sampler.init()
    with ComputeMeter() as m:
        for _ in range(draws):
            plan = sampler.sample(state, g)
            state = sampler.update(state, plan, None)
            estimate(chain, plan, params, chain.sample_start(n, g), generator=g)
    return m.total / (n * draws)


def surrogate_evaluations(chain, plan: Plan, params, at: list, n: int, seed: int, **kw) -> float:
    """Evaluations per sample and update, counted by the meter, of one recorded rollout and one
    clipped-surrogate pass at each of the parameters ``at`` (a rollout feeding len(at) updates)."""
    g = gen(seed)
    with ComputeMeter() as m:
        rec = record(chain, plan, params, chain.sample_start(n, g), generator=g)
        for p in at:
            clipped_surrogate(rec, p, **kw)
    return m.total / (n * len(at))


def engine_check(chain, plan: Plan, params, x_T, seed: int, terms: StepTerms, adv, c: torch.Tensor) -> float:
    """The largest difference, relative to its size, between the engine's batch-mean estimate of
    ``plan`` (advantage ``adv``, rewards offset by ``c``) and the one assembled from ``terms``,
    the step terms of the same start states and noise."""
    est = estimate(Offset(chain, c), plan, params, x_T, generator=gen(seed), baseline=adv)
    want = flatten(est.grad).double()
    path = path_kind(plan)
    A = None if path else advantage(terms.reward + c, adv)
    got = assemble(terms, torch.tensor([step_weights(plan)], dtype=torch.float64), path, A)[0]
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


@dataclass(frozen=True)
class Summary:
    """One estimator against the truth (:func:`summarise`): relative bias |E g - truth| / |truth|,
    cos(E g, truth) and |E g| / |truth| (``scale``), the bias and cosine with 95% intervals; the
    resolution sqrt(tr Cov(mean g - truth)) / |truth|, what the bias's plain estimate is when the
    bias is 0; Hotelling's p (None with too few rows); the variance per sample, batch x tr Cov
    of a batch mean, with its normal 95% interval; and |E g|."""

    bias: float
    bias_ci: tuple[float, float]
    cos: float
    cos_ci: tuple[float, float]
    scale: float
    resolution: float
    pvalue: float | None
    var: float
    var_ci: tuple[float, float]
    mean_norm: float


def summarise(rows: torch.Tensor, batch: int, *, truth: torch.Tensor | None = None,
              truth_var: torch.Tensor | None = None, ref: torch.Tensor | None = None,
              paired: bool = False) -> Summary:
    """Summary of the batch-mean ``rows`` ``[n, P]`` against a fixed ``truth`` (with per-coordinate
    variances ``truth_var``, if it is itself an estimate) or the mean of reference rows ``ref``,
    drawn on the same noise (``paired``) or independently.

    With b = mean g - truth and C its covariance, |b|^2 - tr C estimates |E g - truth|^2 without
    bias, with variance about 4 b^T C b + 2 tr C^2: its normal 95% interval, clipped at 0, gives
    the bias's interval (so a zero bias has one that reaches 0). The cosine takes the same
    correction of |mean g|^2 and mean g . truth, with a delta-method normal interval."""
    x = rows.double().numpy()
    n, P = x.shape
    Cm, Cmt = np.cov(x, rowvar=False).reshape(P, P) / n, np.zeros((P, P))
    if ref is None:
        t = truth.double().numpy()
        Ct = np.diag(truth_var.double().numpy()) if truth_var is not None else np.zeros((P, P))
    else:
        r = ref.double().numpy()
        t = r.mean(0)
        if paired:
            C = np.cov(np.hstack([x, r]), rowvar=False) / n
            Cm, Ct, Cmt = C[:P, :P], C[P:, P:], C[:P, P:]
        else:
            Ct = np.cov(r, rowvar=False).reshape(P, P) / r.shape[0]
    m = x.mean(0)
    b, Cb = m - t, Cm + Ct - Cmt - Cmt.T
    tn = float(np.linalg.norm(t))
    U = float(b @ b - np.trace(Cb))
    sd = float(np.sqrt(max(4 * b @ Cb @ b + 2 * np.trace(Cb @ Cb), 0.0)))
    root = lambda v: float(np.sqrt(max(v, 0.0))) / tn  # noqa: E731
    mm, tt, mt = m @ m - np.trace(Cm), t @ t - np.trace(Ct), m @ t - np.trace(Cmt)
    if mm <= 0 or tt <= 0:
        mm, tt, mt = m @ m, t @ t, m @ t
    cos = float(np.clip(mt / np.sqrt(mm * tt), -1, 1))
    mn = float(np.linalg.norm(m))
    gm, gt = t / (mn * tn) - cos * m / mn ** 2, m / (mn * tn) - cos * t / tn ** 2
    cos_sd = float(np.sqrt(max(gm @ Cm @ gm + gt @ Ct @ gt + 2 * gm @ Cmt @ gt, 0.0)))
    pvalue = None
    if n > P + 1:
        if ref is None:
            pvalue = mean_test(rows.double(), truth.double()).pvalue
        elif paired:
            pvalue = mean_test(rows.double() - ref.double(), torch.zeros(P, dtype=torch.float64)).pvalue
        else:
            pvalue = two_sample_test(rows.double(), ref.double()).pvalue
    tv = trace_var(rows)
    return Summary(root(U), (root(U - Z95 * sd), root(U + Z95 * sd)), cos,
                   (max(cos - Z95 * cos_sd, -1.0), min(cos + Z95 * cos_sd, 1.0)), float(np.sqrt(mm / tt)),
                   float(np.sqrt(np.trace(Cb))) / tn, pvalue, batch * tv.value, (batch * tv.lo, batch * tv.hi),
                   float(np.sqrt(mm)))


def path_kl(chain, params, reference, law=None) -> torch.Tensor:
    """KL(p_theta || p_ref) over the paths of a linear-Gaussian chain without parameter noise:
    sum_t E|A x_t + c|^2 / (2 sigma_t^2) with A = W - W_ref, c = b - b_ref, and x_t's exact
    moments, E|A x + c|^2 = tr(A S A^T) + |A m + c|^2, propagated under ``law`` (default: the
    same ``params``; other parameters give the law held fixed, as the field's estimate holds it)."""
    if not chain.is_gaussian:
        raise ValueError("the path KL is exact only without parameter noise (tau = 0)")
    law = params if law is None else law
    W, b, Wl, bl = params["W"], params["b"], law["W"], law["b"]
    A, c = W - reference["W"], b - reference["b"]
    m = chain.x_T_mean.to(W)
    S = chain.x_T_std ** 2 * torch.eye(chain.d, dtype=W.dtype)
    kl = W.new_zeros(())
    for t in range(chain.T, 0, -1):
        sig2 = chain.sigma(t) ** 2
        kl = kl + (torch.trace(A @ S @ A.T) + (A @ m + c).pow(2).sum()) / (2 * sig2)
        m, S = Wl @ m + bl, Wl @ S @ Wl.T + sig2 * torch.eye(chain.d, dtype=W.dtype)
    return kl


def kl_gradients(chain, params, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of the path KL, its direct part: the gradient with x_t's law held at ``params``),
    flattened, exactly."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        total = torch.autograd.grad(path_kl(chain, leaves, reference), list(leaves.values()))
        frozen = {k: v.detach() for k, v in leaves.items()}
        direct = torch.autograd.grad(path_kl(chain, leaves, reference, frozen), list(leaves.values()))
    return torch.cat([g.reshape(-1) for g in total]), torch.cat([g.reshape(-1) for g in direct])
