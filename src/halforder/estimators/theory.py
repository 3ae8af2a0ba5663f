"""The paper's theory as functions: the budget model and h* (sec. 4.2, app. J.6), the
truncation bias (Prop. 6.1), the convergence bound (Thm. 6.4), and per-step pathwise
gradients with the variance floor of paired ZO they imply (docs/design.md, "Antithetic pairing").

Choosing h (eq. 7). RLR(h) has one FO step, h HO steps and T-1-h ZO steps. With per-step
standard deviations V_h (FO and HO) and V_z (ZO), the bound (14), sum of variances plus
twice the sum over pairs t < t' of the products of standard deviations, is

    S(h) = (sum_t s_t)^2 = ((h+1) V_h + (T-1-h) V_z)^2
         = a (h+1)^2 + b (h+1) + c,   a = (V_z - V_h)^2,  b = -2 T V_z (V_z - V_h),  c = T^2 V_z^2,

which is eq. (18) with the c the paper leaves out. Its vertex is at
h + 1 = -b / (2a) = T V_z / (V_z - V_h) >= T, not at T V_z / (2 (V_z - V_h)) as eq. (19)
prints: (19) divides by 4a. Since sum_t s_t is linear in h with slope V_h - V_z and stays
positive, S(h) is strictly decreasing on 0..T-1 when V_h < V_z (increasing when V_h > V_z),
so the budget B_h h + B_z (T-1-h) <= B alone decides h*: the largest affordable h.
:func:`solve_h_star` minimises S over the feasible integers by enumeration and reports the
paper's closed form (8) beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .draws import draw_estimates, flatten
from .engine import _grad, block_score, gradient_leaves
from .rollout import roll_out
from .pairing import Pairing
from .plan import Plan
from .protocol import latent


# ----------------------------------------------------------------------------- budget
def _check_rlr_T(T: int) -> None:
    if int(T) != T or T < 2:
        raise ValueError(f"RLR needs an integer T >= 2 (h ranges over 0..T-1), got T={T!r}")


def _check_rlr(h: int, T: int) -> None:
    """RLR(h) on T steps exists (its ranges are Plan.rlr's)."""
    _check_rlr_T(T)
    Plan.rlr(T, h, None if h == 0 else 2)


def budget_cost(h: int, T: int, B_h: float, B_z: float) -> float:
    """Memory of RLR(h) in the model of eq. (7): B_h * h + B_z * (T - 1 - h)."""
    _check_rlr(h, T)
    if B_h < 0 or B_z < 0:
        raise ValueError(f"per-step costs must be >= 0, got B_h={B_h}, B_z={B_z}")
    return B_h * h + B_z * (T - 1 - h)


def feasible_h(T: int, B: float, B_h: float, B_z: float) -> list[int]:
    """All integers h in 0..T-1 with B_h h + B_z (T-1-h) <= B (possibly empty)."""
    return [h for h in range(T) if budget_cost(h, T, B_h, B_z) <= B]


# -------------------------------------------------------------------------- surrogate
def variance_surrogate(h: int, T: int, V_h: float, V_z: float, ordered_pairs: bool = False) -> float:
    """The variance bound of eq. (14) for RLR(h), as used in problem (7).

    Step 1 (FO) and the h HO steps have standard deviation V_h, the T-1-h ZO steps V_z
    (the paper's V_h^2, V_z^2 are variances). With ``ordered_pairs=False`` the cross term
    is 2 sum_{t<t'} s_t s_t' as in (14), so the bound is (sum_t s_t)^2 = Q(h) of eq. (18).
    ``ordered_pairs=True`` reads the 2 sum_{t != t'} of (7) literally over ordered pairs,
    which double-counts: 2 (sum_t s_t)^2 - sum_t s_t^2.
    """
    _check_rlr(h, T)
    if V_h < 0 or V_z < 0:
        raise ValueError(f"V_h and V_z are standard deviations, must be >= 0 (got {V_h}, {V_z})")
    n_h, n_z = h + 1, T - 1 - h
    s = T * V_z - n_h * (V_z - V_h)  # = n_h V_h + n_z V_z, written so that it is monotone in h in floats too
    if ordered_pairs:
        return 2.0 * s * s - (n_h * V_h ** 2 + n_z * V_z ** 2)
    return s * s


def quadratic_coefficients(T: int, V_h: float, V_z: float) -> tuple[float, float, float]:
    """(a, b, c) of eq. (18), Q(h) = a (h+1)^2 + b (h+1) + c, with c = T^2 V_z^2
    (the paper gives a and b only); Q equals :func:`variance_surrogate`."""
    return (V_z - V_h) ** 2, -2.0 * T * V_z * (V_z - V_h), (T * V_z) ** 2


def vertex_h(T: int, V_h: float, V_z: float) -> float:
    """The unconstrained minimiser of Q in h, -b/(2a) - 1 = T V_z / (V_z - V_h) - 1
    (>= T - 1 whenever V_h < V_z, so outside or at the end of 0..T-1). Needs V_h < V_z."""
    if not V_z > V_h:
        raise ValueError(f"Q(h) has a minimum only when V_h < V_z (got V_h={V_h}, V_z={V_z})")
    return T * V_z / (V_z - V_h) - 1.0  # -b/(2a) - 1, with (V_z - V_h) cancelled


def paper_vertex_h(T: int, V_h: float, V_z: float) -> float:
    """Eq. (19) as printed: T (V_z^2 - V_h V_z) / (2 (V_h^2 + V_z^2 - 2 V_h V_z)) - 1
    = T V_z / (2 (V_z - V_h)) - 1. Needs V_h < V_z."""
    if not V_z > V_h:
        raise ValueError(f"eq. (19) assumes V_h < V_z (got V_h={V_h}, V_z={V_z})")
    return T * V_z / (2.0 * (V_z - V_h)) - 1.0  # (19) with (V_z - V_h) cancelled (no underflow)


def paper_h_star(T: int, V_h: float, V_z: float, B: float, B_h: float, B_z: float) -> int:
    """Eq. (8): min{ floor((B - B_z (T-1)) / (B_h - B_z)), floor(T V_z / (2 (V_z - V_h)) - 1) }.

    Needs the paper's assumptions B_h > B_z and V_h < V_z (``ValueError`` otherwise). The
    value is returned as printed, even where it is negative or above T - 1."""
    _check_rlr_T(T)
    if not B_h > B_z:
        raise ValueError(f"eq. (8) assumes B_h > B_z (got B_h={B_h}, B_z={B_z})")
    budget_term = math.floor((B - B_z * (T - 1)) / (B_h - B_z))
    vertex_term = paper_vertex_h(T, V_h, V_z)
    return budget_term if vertex_term >= budget_term else math.floor(vertex_term)


@dataclass(frozen=True)
class HStar:
    """Result of :func:`solve_h_star`.

    Attributes:
      h: the exact minimiser of the surrogate over the feasible integers (the smallest
        one if several tie).
      feasible: the feasible h, ascending.
      surrogate: the surrogate at each feasible h.
      h_budget: the largest feasible h.
      paper_h: eq. (8) as printed, or None where its assumptions (B_h > B_z, V_h < V_z) fail.
      vertex: the true unconstrained minimiser T V_z / (V_z - V_h) - 1 (None unless V_h < V_z).
      paper_vertex: eq. (19)'s T V_z / (2 (V_z - V_h)) - 1 (None unless V_h < V_z).
      decreasing: whether the surrogate strictly decreases along ``feasible``.
    """

    h: int
    feasible: tuple[int, ...]
    surrogate: tuple[float, ...]
    h_budget: int
    paper_h: int | None
    vertex: float | None
    paper_vertex: float | None
    decreasing: bool


def solve_h_star(T: int, V_h: float, V_z: float, B: float, B_h: float, B_z: float,
                 ordered_pairs: bool = False) -> HStar:
    """h* of problem (7) by exact integer minimisation over all feasible h in 0..T-1.

    Raises ``ValueError`` when no h fits the budget."""
    feas = feasible_h(T, B, B_h, B_z)
    if not feas:
        raise ValueError(f"no h in 0..{T - 1} satisfies B_h h + B_z (T-1-h) <= B "
                         f"(B={B}, B_h={B_h}, B_z={B_z}; h=0 needs {budget_cost(0, T, B_h, B_z)})")
    vals = [variance_surrogate(h, T, V_h, V_z, ordered_pairs) for h in feas]
    best = min(range(len(feas)), key=lambda i: (vals[i], feas[i]))
    ok = V_z > V_h
    paper = paper_h_star(T, V_h, V_z, B, B_h, B_z) if ok and B_h > B_z else None
    return HStar(h=feas[best], feasible=tuple(feas), surrogate=tuple(vals), h_budget=max(feas),
                 paper_h=paper, vertex=vertex_h(T, V_h, V_z) if ok else None,
                 paper_vertex=paper_vertex_h(T, V_h, V_z) if ok else None,
                 decreasing=all(b < a for a, b in zip(vals, vals[1:])))


# --------------------------------------------------------------- per-step variances
@dataclass(frozen=True)
class StepVariances:
    """Per-step variances measured with the engine (traces of covariance, per sample).

    Attributes:
      steps: the steps t measured.
      ho: tr Var of the HO estimate of grad_{theta_t} J (a block of length 1 at t).
      zo: tr Var of the ZO estimate of grad_{theta_t} J.
      fo1: tr Var of the FO estimate of grad_{theta_1} J (truncated backprop, K = 1).
      n: samples per step and role.
    """

    steps: tuple[int, ...]
    ho: tuple[float, ...]
    zo: tuple[float, ...]
    fo1: float
    n: int

    @property
    def V_h(self) -> float:
        """Per-step standard deviation of HO: sqrt of the mean of ``ho``."""
        return float(np.sqrt(np.mean(self.ho)))

    @property
    def V_z(self) -> float:
        """Per-step standard deviation of ZO: sqrt of the mean of ``zo``."""
        return float(np.sqrt(np.mean(self.zo)))


def single_step_plan(T: int, t: int, role: str) -> Plan:
    """A plan with ``role`` ("HO" or "ZO") on step t only and NONE elsewhere: the
    estimator of grad_{theta_t} J alone."""
    if role not in ("HO", "ZO"):
        raise ValueError(f"role must be 'HO' or 'ZO', got {role!r}")
    if not 1 <= t <= T:
        raise ValueError(f"step {t} is not in 1..{T}")
    roles = ["NONE"] * T
    roles[t - 1] = role
    return Plan.from_roles(roles, name=f"{role}@{t}")


def measure_step_variances(chain, params: Mapping[str, torch.Tensor], n: int, *, generator: torch.Generator,
                           steps: Sequence[int] | None = None, baseline=None) -> StepVariances:
    """Measure (V_h, V_z) on ``chain``: for each step t in ``steps`` (default 2..T, the
    steps RLR can give HO or ZO), n samples of the single-step HO and ZO estimators."""
    T = chain.T
    steps = tuple(range(2, T + 1)) if steps is None else tuple(int(t) for t in steps)
    if not steps:
        raise ValueError("measure at least one step")
    if n < 2:
        raise ValueError("n must be >= 2 to estimate a variance")
    ho, zo = [], []
    for t in steps:
        for role, out in (("HO", ho), ("ZO", zo)):
            s = draw_estimates(chain, single_step_plan(T, t, role), params, n, generator=generator, baseline=baseline)
            out.append(float(s.grad.var(0).sum()))
    fo = draw_estimates(chain, Plan.truncated(T, 1), params, n, generator=generator)
    return StepVariances(steps, tuple(ho), tuple(zo), float(fo.grad.var(0).sum()), n)


def pathwise_step_gradients(chain_for, params: Mapping[str, torch.Tensor], T: int, n: int, *,
                            seed: int = 0) -> torch.Tensor:
    """Per-sample pathwise gradients through each step's parameters alone, ``[T, n, d]`` (the
    parameters flattened in order), from ``n`` rollouts of full backprop on
    ``chain_for(Plan.full(T))`` drawn from ``seed`` (:func:`step_gradients`):
    g_t = truncated(t) - truncated(t-1) on the same noise.

    ``chain_for(plan)`` gives the chain of a plan (a :data:`~halforder.estimators.plan.ChainFor`)."""
    chain = chain_for(Plan.full(T))
    g = torch.Generator().manual_seed(seed)
    grads, _, _ = step_gradients(chain, params, chain.sample_start(n, g), generator=g)
    return grads.double().transpose(0, 1)


def step_gradients(chain, params, x_T, *, generator: torch.Generator, pairing: Pairing = Pairing()):
    """One rollout of full backprop from ``x_T`` on ``chain``, with noise drawn as
    :func:`~halforder.estimators.estimate` draws it (so the same seed gives the same path
    as truncated(K)): ``(g, R, eps)``, the per-sample g_t ``[N, T, P]`` (the parameters
    flattened in order), R ``[N]`` and the parameter noise eps'_t ``[N, T, P]`` (zeros where
    tau_t = 0). With ``pairing`` the rows come in its groups (give grouped ``x_T``)."""
    N, T = latent(x_T).shape[0], chain.T
    leaves = [gradient_leaves(params, N) for _ in range(T)]
    noise = [{k: torch.zeros((N, *v.shape), dtype=v.dtype, device=v.device) for k, v in params.items()}
             for _ in range(T)]

    def keep(t, x, drawn):
        if drawn.dtheta is not None:
            noise[t - 1] = {k: d / drawn.tau for k, d in drawn.dtheta.items()}

    x = roll_out(chain, x_T, lambda t: leaves[t - 1], generator=generator, pairing=pairing, grad=range(1, T + 1),
                 shapes=params, visit=keep).x
    with torch.enable_grad():
        R = chain.reward(latent(x))
        grads = _grad(R.sum(), {(t, k): v for t, leaf in enumerate(leaves) for k, v in leaf.items()}, lambda g: g)
    g = torch.stack([flatten({k: grads[(t, k)] for k in params}, sample_axis=True) for t in range(T)], 1)
    eps_param = torch.stack([flatten(noise[t], sample_axis=True) for t in range(T)], 1)
    return g, R.detach(), eps_param


def step_scores(chain, params, x_T, *, generator: torch.Generator, pairing: Pairing = Pairing()):
    """One rollout from ``x_T`` with the engine's draws, and every step's likelihood-ratio score
    in one backward pass: ``(S, R)``, S ``[N, T, P]`` the per-sample gradient of
    <phi_t(x_t; theta_t), eps_t> / sigma_t through theta_t alone at the recorded x_t (zeros
    where sigma_t = 0), and R ``[N]``. REINFORCE's term at step t is A_n S_{n,t} for an
    advantage A_n (:mod:`~halforder.estimators.baselines`); with the chain's parameter noise
    it is the score at the perturbed parameters."""
    N, T = latent(x_T).shape[0], chain.T
    noisy = [t for t in range(1, T + 1) if float(chain.sigma(t)) > 0]
    with torch.no_grad():
        out = roll_out(chain, x_T, {k: v.detach() for k, v in params.items()}, generator=generator, pairing=pairing,
                       record=noisy)
        R = chain.reward(latent(out.x)).detach()
    leaves = {t: gradient_leaves(params, N) for t in noisy}
    unit = Plan.reinforce(T)             # weight 1 on every step: the engine's score of each step
    with torch.enable_grad():
        total = sum(block_score(chain, unit, leaves[t], out.steps, t, 1).sum() for t in noisy)
        grads = _grad(total, {(t, k): v for t, leaf in leaves.items() for k, v in leaf.items()}, lambda g: g)
    zero = torch.zeros((N, sum(v.numel() for v in params.values())), dtype=next(iter(params.values())).dtype)
    S = torch.stack([flatten({k: grads[(t, k)] for k in params}, sample_axis=True) if t in leaves else zero
                     for t in range(1, T + 1)], 1)
    return S, R


def paired_zo_floor(g: torch.Tensor) -> float:
    """The variance (trace of the covariance) of one antithetic pair of ZO estimates to first
    order in tau, from the per-sample pathwise gradients ``g`` ``[m, n, d]`` of its m ZO steps
    (:func:`pathwise_step_gradients`).

    With its own noise eps'_t ~ N(0, I_d) at each ZO step, a pair's estimate is
    (sum_s g_s . eps'_s)(sum_t eps'_t) to first order; for jointly Gaussian a = sum_s g_s . eps'_s
    and b = sum_t eps'_t, E[a^2 |b|^2] = E a^2 E|b|^2 + 2 |E[a b]|^2 with E|b|^2 = m d and
    E[a b] = G = sum_t g_t, so Var = m d sum_s E|g_s|^2 + 2 E|G|^2 - |E G|^2: m times the
    floor d sum_s E|g_s|^2 of one perturbation shared by all steps."""
    m, _, d = g.shape
    G = g.sum(0)
    return float(m * d * g.pow(2).sum((0, 2)).mean() + 2 * G.pow(2).sum(1).mean() - G.mean(0).pow(2).sum())


# ----------------------------------------------------------------- truncation bias
def truncation_bias(chain, params, k: int) -> dict[str, torch.Tensor]:
    """Prop. 6.1: grad J - E[truncated-k estimate] = sum_{t > k} grad_{theta_t} J, exactly
    (on a chain with ``exact_truncation_bias``, e.g. the linear-Gaussian chain)."""
    if not hasattr(chain, "exact_truncation_bias"):
        raise ValueError(f"{type(chain).__name__} has no exact per-step gradients; use the linear-Gaussian chain")
    return chain.exact_truncation_bias(params, k)


def truncation_bias_curve(chain, params) -> tuple[np.ndarray, np.ndarray, float]:
    """For k = 1..T at once: the norm of the Prop. 6.1 bias, its norm relative to |grad J|,
    and |grad J|. Uses one pass of ``chain.exact_step_grads``."""
    if not hasattr(chain, "exact_step_grads"):
        raise ValueError(f"{type(chain).__name__} has no exact per-step gradients; use the linear-Gaussian chain")
    g = torch.cat([v.reshape(chain.T, -1) for v in chain.exact_step_grads(params).values()], dim=1)
    total = float(g.sum(0).norm())
    tails = torch.flip(torch.cumsum(torch.flip(g, [0]), 0), [0])  # tails[k] = sum_{t > k} g_t (0-based rows)
    norms = np.array([float(tails[k].norm()) if k < chain.T else 0.0 for k in range(1, chain.T + 1)])
    return norms, norms / total, total


# ------------------------------------------------------------------ Theorem 6.4
def _check_conv(K, L, delta0, sigma2):
    if K < 0 or L <= 0 or delta0 < 0 or sigma2 < 0:
        raise ValueError(f"need K >= 0, L > 0, delta0 >= 0, sigma2 >= 0 (got {K}, {L}, {delta0}, {sigma2})")


def theorem_6_4_step_size(K: int, L: float, delta0: float, sigma2: float) -> float:
    """The step size of the proof of Thm. 6.4 (app. J.5) for K+1 iterations:
    gamma = [ (2 delta0 / ((K+1) L sigma2))^(-1/2) + L ]^(-1)  (<= 1/L)."""
    _check_conv(K, L, delta0, sigma2)
    if delta0 == 0:
        raise ValueError("delta0 = 0: theta_0 is already optimal and the step size of J.5 is 0")
    return 1.0 / (math.sqrt((K + 1) * L * sigma2 / (2.0 * delta0)) + L)


def theorem_6_4_bound(K: int, L: float, delta0: float, sigma2: float) -> float:
    """Thm. 6.4: (1/(K+1)) sum_{k<=K} E|grad J(theta_k)|^2 <= sqrt(8 L delta0 sigma2/(K+1)) + 2 L delta0/(K+1),
    for SGD with :func:`theorem_6_4_step_size`. sigma2 bounds E|g - grad J|^2 of the
    gradient estimate used per iteration (per-sample variance / batch size)."""
    _check_conv(K, L, delta0, sigma2)
    return math.sqrt(8.0 * L * delta0 * sigma2 / (K + 1)) + 2.0 * L * delta0 / (K + 1)


def sgd_bound(K: int, gamma: float, L: float, delta0: float, sigma2: float) -> float:
    """The bound inside the proof of Thm. 6.4 for a fixed step gamma <= 1/L:
    (1/(K+1)) sum_{k<=K} E|grad J(theta_k)|^2 <= 2 delta0 / (gamma (K+1)) + gamma L sigma2."""
    _check_conv(K, L, delta0, sigma2)
    if not 0 < gamma <= 1.0 / L:
        raise ValueError(f"the bound needs 0 < gamma <= 1/L = {1.0 / L}, got {gamma}")
    return 2.0 * delta0 / (gamma * (K + 1)) + gamma * L * sigma2


def smoothness(objective: Callable[[dict], torch.Tensor], params: Mapping[str, torch.Tensor]) -> float:
    """Spectral norm of the Hessian of ``objective`` at ``params`` (flattened): a local
    value of the constant L of Thm. 6.4. J is a polynomial in theta, not globally L-smooth."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f(flat):
        parts = torch.split(flat, sizes)
        return objective({k: p.reshape(s) for k, p, s in zip(names, parts, shapes)})

    H = torch.autograd.functional.hessian(f, flat0)
    return float(torch.linalg.eigvalsh(0.5 * (H + H.T)).abs().max())
