"""One engine for every plan: ``estimate(chain, plan, params, x_T)``.

The estimate of grad J, J(theta) = E[R(x_0)], is the gradient of a per-sample surrogate,
one per role (the mc_gradients pattern):

    FO   R(x_0), with the graph of steps K..1 kept               (pathwise, Prop. 6.1)
    HO   sg(R - b) * <Phi_j(x_{j+h-1}; theta), eps_j> / sigma_j   (eq. 6, 2nd term;
         Phi_j is the block's mean of x_{j-1}, recomputed from the stored x_{j+h-1})
    ZO   sg(R - b) * <theta_t, eps'_t> / tau_t                    (eq. 6, 3rd term)

Signs: with x = m + s*eps, grad_m log N(x; m, s^2) = eps/s, so the likelihood-ratio terms
carry a plus sign here; the paper's minus in eq. (6) multiplies grad_z log f(z) = -eps/s.
The ZO surrogate's gradient is computed in closed form, R * eps'_t / tau_t, from a
running sum of eps'_t / tau_t per sample: no per-step parameter noise is kept.

With ``pairing``, samples come in antithetic groups of consecutive rows that share their
noise except for a mirrored part (:mod:`~halforder.estimators.pairing`); every member's
estimate is unbiased, and so is their mean.

Memory follows ``Plan.cost()``: the rollout keeps only the FO prefix's graph; each HO
block is recomputed from its stored input state (and its own h steps of noise) after
the FO backward pass has freed that graph.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Union

import torch

from .baselines import leave_one_out, normalised_advantage
from .pairing import Pairing
from .protocol import Chain, State, check_chain, detach, latent, with_latent
from .plan import Plan, Role

Baseline = Union[None, str, float, torch.Tensor]


@dataclass(frozen=True)
class Estimate:
    """The result of :func:`estimate`.

    Attributes:
      grad: parameter name -> estimate of grad J (the batch mean, or ``[N, *shape]``
        per-sample estimates when ``per_sample=True``).
      reward: R(x_0) per sample, shape ``[N]`` (detached).
      parts: ``{"FO": ..., "HO": ..., "ZO": ...}``, each a dict like ``grad``; they add
        up to ``grad``.
    """

    grad: dict[str, torch.Tensor]
    reward: torch.Tensor
    parts: dict[str, dict[str, torch.Tensor]]


def estimate(chain: Chain, plan: Plan, params: Mapping[str, torch.Tensor], x_T: State, *,
             generator: torch.Generator | None = None, per_sample: bool = False,
             baseline: Baseline = None, pairing: str | Pairing | None = None) -> Estimate:
    """Estimate grad_theta E[R(x_0)] with ``plan`` over ``chain``, from the start states ``x_T``.

    Args:
      chain: a :class:`~halforder.estimators.protocol.Chain`.
      plan: a :class:`~halforder.estimators.plan.Plan` with ``plan.T == chain.T``; its
        roles' needs are checked on the chain (``ValueError`` naming the step otherwise).
      params: name -> tensor, the parameters theta (their own shapes, no sample axis).
      x_T: start states, sample axis first (N samples).
      generator: the source of every noise draw (eps and eps'); the global RNG if None.
      per_sample: return ``[N, *shape]`` per-sample estimates instead of their mean.
      baseline: control variate b subtracted from R in the HO and ZO terms: None, a number,
        a tensor of shape [N] that does not depend on this batch's noise, or ``"loo"`` for
        the leave-one-out mean over the batch (over the other groups, with pairing). Each
        keeps the estimate unbiased. ``"grpo"`` instead uses GRPO's normalised advantage
        (R - mean) / std over the batch in place of R - b: biased
        (:func:`~halforder.estimators.baselines.normalised_advantage`).
      pairing: ``None``/``"none"`` (independent samples), ``"param"``, ``"ho"`` or
        ``"param+ho"``: rows come in antithetic groups of G = 2 or 4 consecutive samples that
        share every noise draw except the mirrored ones (see
        :mod:`~halforder.estimators.pairing`). N must be a multiple of G; give the members
        of a group the same start state (:func:`~halforder.estimators.pairing.grouped`)
        for the variance reduction. ``per_sample`` rows are per member; the mean over a
        group is one i.i.d. estimate. Memory and compute are those of N samples.

    Returns:
      An :class:`Estimate`.
    """
    with checked_inputs(chain, plan, params, x_T):
        return _estimate(chain, plan, params, x_T, generator, per_sample, baseline, pairing)


@contextlib.contextmanager
def checked_inputs(chain, plan, params, x_T: State | None = None) -> Iterator[None]:
    """The one check of :func:`estimate`'s arguments, once per call: ``TypeError`` or
    ``ValueError`` naming the mistake (plan and chain swapped, a chain outside the protocol, a
    plan the chain cannot run, ``params`` that are not tensors by name, ``x_T`` (if given) not
    shaped like the chain's start states); a chain's lookup of a parameter name that
    ``params`` lacks (:class:`MissingParameter`, raised inside the block) becomes a
    ``ValueError`` that names it. A ``KeyError`` from anywhere else passes through unchanged."""
    if isinstance(chain, Plan) and not isinstance(plan, Plan):
        raise TypeError("estimate(chain, plan, params, x_T): the plan came first; pass the chain first, then the plan")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan (e.g. Plan.rlr(T, h, j)), got {type(plan).__name__}")
    check_chain(chain)
    plan.validate(chain)
    if not isinstance(params, Mapping) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise TypeError(f"params must map parameter names to tensors, got {type(params).__name__}")
    if x_T is not None:
        _check_start(chain, x_T)
    try:
        yield
    except MissingParameter as e:
        raise ValueError(f"the chain looks up parameter {e.args[0]!r}, which params lacks (params holds: "
                         f"{', '.join(map(str, params)) or 'nothing'})") from e


def _check_start(chain, x_T: State) -> None:
    lat = latent(x_T)
    if not isinstance(lat, torch.Tensor) or lat.dim() == 0:
        raise TypeError(f"x_T must be start states with the sample axis first (chain.sample_start(n, generator)), "
                        f"got {type(lat).__name__}")
    want = _shape(chain.sample_start(1, torch.Generator(device=lat.device)))   # one draw, for its shape
    if _shape(x_T) != want:
        raise ValueError(f"x_T has per-sample shape {_shape(x_T)} (shape {_shape(x_T, 0)}), but the chain's start "
                         f"states have {want}: x_T must be [N, ...] with the sample axis first, as "
                         f"chain.sample_start(N, generator) returns")


def _shape(x: State, skip: int = 1):
    """A state's per-sample shape (its whole shape with ``skip=0``; a tuple of them for tuple states)."""
    return tuple(_shape(v, skip) for v in x) if isinstance(x, tuple) else tuple(x.shape[skip:])


def _estimate(chain, plan, params, x_T, generator, per_sample, baseline, pairing) -> Estimate:
    pairing = Pairing.parse(pairing)
    G = pairing.size
    x0_latent = latent(x_T)
    N = x0_latent.shape[0]
    if N % G:
        raise ValueError(f"pairing {pairing.name!r} draws groups of {G} samples, but x_T has {N} rows")
    ends = {j for j, _ in plan.blocks}
    if per_sample:
        leaves = _Named({k: v.detach().unsqueeze(0).repeat(N, *([1] * v.dim())).requires_grad_()
                         for k, v in params.items()})
    else:
        leaves = _Named({k: v.detach().requires_grad_() for k, v in params.items()})
    frozen = _Named({k: v.detach() for k, v in leaves.items()})
    K = plan.fo_steps
    block_start = {j + h - 1: (j, h) for j, h in plan.blocks}
    ho_steps = set(plan.steps(Role.HO))
    zo_steps = set(plan.steps(Role.ZO))
    zo_sum = {k: v.new_zeros((N, *v.shape)) for k, v in params.items()} if zo_steps else None
    stored: dict[tuple[int, int], dict] = {}
    noise: dict[int, tuple] = {}

    x = x_T
    for t in range(plan.T, 0, -1):
        tau, sig = float(chain.tau(t)), float(chain.sigma(t))
        dtheta = {k: pairing.expand(torch.randn((N // G, *v.shape), generator=generator, dtype=v.dtype,
                                                device=v.device).mul_(tau), "param")
                  for k, v in params.items()} if tau > 0 else None
        lat = latent(x)
        eps = pairing.expand(torch.randn((N // G, *lat.shape[1:]), generator=generator, dtype=lat.dtype,
                                         device=lat.device), "ho" if t in ends else "inherent") if sig > 0 else None
        if t in block_start:
            stored[block_start[t]] = detach(x)
        if t in ho_steps:
            noise[t] = (dtheta, eps)
        if t in zo_steps:
            for k in zo_sum:  # running sum of eps'_t / tau_t = dtheta / tau^2
                zo_sum[k].add_(dtheta[k], alpha=1.0 / tau ** 2)
        if t <= K:
            with torch.enable_grad():
                x = noisy_step(chain, t, x, perturb(leaves, dtheta), sig, eps)
        else:
            with torch.no_grad():
                x = noisy_step(chain, t, x, perturb(frozen, dtheta), sig, eps)

    with torch.set_grad_enabled(K > 0):
        R = chain.reward(latent(x))
    if R.shape != (N,):
        raise ValueError(f"chain.reward must return shape [{N}], got {tuple(R.shape)}")
    reduce = (lambda g: g) if per_sample else (lambda g: g / N)
    zeros = {k: (v.new_zeros((N, *v.shape)) if per_sample else v.new_zeros(v.shape)) for k, v in params.items()}

    fo = dict(zeros)
    if K > 0:
        fo = _grad(R.sum(), leaves, reduce)
    w = normalised_advantage(R.detach()) if baseline == "grpo" else R.detach() - _baseline(R.detach(), baseline, G)

    ho = dict(zeros)
    for (j, h), x_in in stored.items():
        with torch.enable_grad():
            xb = x_in
            for t in range(j + h - 1, j, -1):
                dtheta, eps = noise[t]
                xb = noisy_step(chain, t, xb, perturb(leaves, dtheta), float(chain.sigma(t)), eps)
            dtheta, eps_j = noise[j]
            mean = chain.step(j, xb, perturb(leaves, dtheta))
            score = (latent(mean) * eps_j).flatten(1).sum(1) / float(chain.sigma(j))
            g = _grad((w * score).sum(), leaves, reduce)
        ho = {k: ho[k] + g[k] for k in ho}

    zo = dict(zeros)
    if zo_steps:
        zo = {k: (s * w.view(N, *([1] * (s.dim() - 1)))) for k, s in zo_sum.items()}
        if not per_sample:
            zo = {k: v.mean(0) for k, v in zo.items()}

    grad = {k: fo[k] + ho[k] + zo[k] for k in params}
    return Estimate(grad=grad, reward=R.detach(), parts={"FO": fo, "HO": ho, "ZO": zo})


class MissingParameter(KeyError):
    """A chain looked up a parameter name that ``params`` lacks."""


class _Named(dict):
    """The parameters as a chain's step sees them: a name they lack raises
    :class:`MissingParameter` (turned into a ``ValueError`` naming it by :func:`checked_inputs`)."""

    def __missing__(self, key):
        raise MissingParameter(key)


def perturb(params, dtheta):
    """``params`` plus the per-sample parameter noise ``dtheta`` (name -> ``[N, *shape]``;
    None: no noise)."""
    return params if dtheta is None else _Named({k: v + dtheta[k] for k, v in params.items()})


def noisy_step(chain, t: int, x: State, params, sig: float, eps) -> State:
    """One step of the chain: ``chain.step(t, x, params)`` plus ``sig * eps`` on the latent
    (``eps`` None: no inherent noise)."""
    mean = chain.step(t, x, params)
    return mean if eps is None else with_latent(mean, latent(mean) + sig * eps)


def _grad(surrogate, leaves, reduce):
    gs = torch.autograd.grad(surrogate, list(leaves.values()), allow_unused=True)
    return {k: reduce(torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), gs)}


def _baseline(R: torch.Tensor, baseline: Baseline, group: int) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(R)
    if isinstance(baseline, str):
        if baseline != "loo":
            raise ValueError(f"unknown baseline {baseline!r}; use None, a number, a tensor, 'loo' or 'grpo'")
        return leave_one_out(R, group)
    b = torch.as_tensor(baseline, dtype=R.dtype, device=R.device)
    if b.dim() not in (0, 1) or (b.dim() == 1 and b.shape != R.shape):
        raise ValueError(f"a baseline tensor must be a scalar or have shape {tuple(R.shape)}")
    return b.expand_as(R)
