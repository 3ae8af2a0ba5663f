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
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from .baselines import Baseline, advantage
from .pairing import Pairing
from .protocol import Chain, State, check_chain, latent
from .plan import Plan, Role
from .rollout import RecordedStep, noisy_step, perturb, roll_out


@dataclass(frozen=True)
class Estimate:
    """The result of :func:`estimate`.

    Attributes:
      grad: parameter name -> estimate of grad J (the batch mean, or ``[N, *shape]``
        per-sample estimates when ``per_sample=True``).
      reward: R(x_0) per sample, shape ``[N]`` (detached).
      parts: ``{"FO": ..., "HO": ..., "ZO": ...}`` (and any term an estimator adds, e.g. a
        KL penalty's ``"KL"``), each a dict like ``grad``; they add up to ``grad``.
      stats: numbers an estimator reports beside the estimate (e.g. the importance ratio's
        mean and clip fraction), by name.
    """

    grad: dict[str, torch.Tensor]
    reward: torch.Tensor
    parts: dict[str, dict[str, torch.Tensor]]
    stats: dict[str, float] = field(default_factory=dict)


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
      baseline: the weights of the HO and ZO terms (:func:`~halforder.estimators.baselines.advantage`):
        R - b for None, a number, a tensor of shape [N] that does not depend on this batch's
        noise, ``"loo"`` (the leave-one-out mean over the batch, over the other groups with
        pairing) or a :class:`~halforder.estimators.baselines.LeaveOneOut` (within prompt
        groups), each unbiased; GRPO's normalised advantage for ``"grpo"`` or a
        :class:`~halforder.estimators.baselines.GroupNormalised`: biased.
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
    N = latent(x_T).shape[0]
    if N % G:
        raise ValueError(f"pairing {pairing.name!r} draws groups of {G} samples, but x_T has {N} rows")
    leaves = gradient_leaves(params, N if per_sample else None)
    frozen = _Named({k: v.detach() for k, v in leaves.items()})
    K = plan.fo_steps
    zo_steps = set(plan.steps(Role.ZO))
    zo_sum = {k: v.new_zeros((N, *v.shape)) for k, v in params.items()} if zo_steps else None

    def accumulate_zo(t, x, noise):   # running sum of w_t eps'_t / tau_t = w_t dtheta / tau^2
        if t in zo_steps:
            for k in zo_sum:
                zo_sum[k].add_(noise.dtheta[k], alpha=plan.weight(t) / noise.tau ** 2)

    out = roll_out(chain, x_T, lambda t: weighted(leaves, plan.weight(t)) if t <= K else frozen,
                   generator=generator, pairing=pairing, mirrored={j for j, _ in plan.blocks},
                   grad=range(1, K + 1), record={*(j + h - 1 for j, h in plan.blocks), *plan.steps(Role.HO)},
                   shapes=params, visit=accumulate_zo)
    with torch.set_grad_enabled(K > 0):
        R = chain.reward(latent(out.x))
    if R.shape != (N,):
        raise ValueError(f"chain.reward must return shape [{N}], got {tuple(R.shape)}")
    reduce = (lambda g: g) if per_sample else (lambda g: g / N)
    zeros = {k: (v.new_zeros((N, *v.shape)) if per_sample else v.new_zeros(v.shape)) for k, v in params.items()}

    fo = _grad(R.sum(), leaves, reduce) if K > 0 else dict(zeros)
    w = advantage(R.detach(), baseline, G)

    ho = dict(zeros)
    for j, h in reversed(plan.blocks):     # in the rollout's order
        with torch.enable_grad():
            score = block_score(chain, plan, leaves, out.steps, j, h)
            g = _grad((w * score).sum(), leaves, reduce)
        ho = {k: ho[k] + g[k] for k in ho}

    zo = dict(zeros)
    if zo_steps:
        zo = {k: (s * w.view(N, *([1] * (s.dim() - 1)))) for k, s in zo_sum.items()}
        if not per_sample:
            zo = {k: v.mean(0) for k, v in zo.items()}

    grad = {k: fo[k] + ho[k] + zo[k] for k in params}
    return Estimate(grad=grad, reward=R.detach(), parts={"FO": fo, "HO": ho, "ZO": zo})


def gradient_leaves(params, n: int | None = None):
    """``params`` as autograd leaves to differentiate: shared by all samples, or with ``n``
    per-sample copies ``[n, *shape]`` (per-sample gradients)."""
    if n is None:
        return _Named({k: v.detach().requires_grad_() for k, v in params.items()})
    return _Named({k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())).requires_grad_() for k, v in params.items()})


def block_score(chain, plan: Plan, leaves, steps: Mapping[int, RecordedStep], j: int, h: int) -> torch.Tensor:
    """The HO block (j, h)'s score <Phi_j(x_{j+h-1}; theta), eps_j> / sigma_j per sample, ``[N]``:
    recomputed from the recorded input x_{j+h-1} with the recorded noise of steps j+h-1..j+1,
    each step's parameters weighted by its plan weight (so the gradient is the weighted sum)."""
    xb = steps[j + h - 1].x
    for t in range(j + h - 1, j, -1):
        xb = noisy_step(chain, t, xb, weighted(leaves, plan.weight(t)), steps[t].noise)
    last = steps[j].noise
    mean = chain.step(j, xb, perturb(weighted(leaves, plan.weight(j)), last.dtheta))
    return (latent(mean) * last.eps).flatten(1).sum(1) / last.sigma


class _ScaleGrad(torch.autograd.Function):
    """The identity forward; the gradient times w backward."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.w, None


def weighted(params, w: float):
    """``params`` whose gradient is scaled by the step weight ``w`` (their values unchanged;
    ``params`` itself where w = 1)."""
    return params if w == 1.0 else _Named({k: _ScaleGrad.apply(v, w) for k, v in params.items()})


class MissingParameter(KeyError):
    """A chain looked up a parameter name that ``params`` lacks."""


class _Named(dict):
    """The parameters as a chain's step sees them: a name they lack raises
    :class:`MissingParameter` (turned into a ``ValueError`` naming it by :func:`checked_inputs`)."""

    def __missing__(self, key):
        raise MissingParameter(key)


def _grad(surrogate, leaves, reduce):
    gs = torch.autograd.grad(surrogate, list(leaves.values()), allow_unused=True)
    return {k: reduce(torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), gs)}
