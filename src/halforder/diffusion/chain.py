"""A diffusers sampler as a recursive chain (design.md §1) that the estimators drive.

One chain step t (t = T..1, generation order; diffusers' step index is T - t) is

    x_{t-1} = mean_t(x_t; theta) + sigma_t * eps_t,

where mean_t is the scheduler's update with the noise term left out, evaluated on the
model output of a *denoiser*:

    denoiser(x_t, t, params) -> model output (what the scheduler's ``prediction_type``
        names: epsilon, v or sample), classifier-free guidance applied inside,

so any network drives a chain: ``UNet2DConditionModel`` (latents [N,C,H,W], text
conditioning), ``UNet2DModel`` (pixels, unconditional) and ``UNet3DConditionModel``
(latents [N,C,F,H,W]) through :class:`ModuleDenoiser`. ``params`` are the trainable
tensors (the LoRA weights) by name, given to ``torch.func.functional_call``; a leading
sample axis (parameter noise, per-sample gradients) is handled with ``torch.func.vmap``.

Solvers (the part of a scheduler step that does not call the network):

* :class:`DDIMSolver` — DDIM (Song et al. 2021, eq. 12) with eta_t per step,
  sigma_t = eta_t * sqrt((1 - a_{t-1})/(1 - a_t) * (1 - a_t/a_{t-1})), as
  ``DDIMScheduler.step(..., eta=eta_t, variance_noise=eps)``.
* :class:`DPMSolver` — DPM-Solver++(2M) (multistep, midpoint, order 2). Its state is
  the tuple (x, previous data prediction). With s = eta * sigma_next * sqrt(1 - e^{-2h})
  the update is

      x' = c_x x + c_D (D0 + D1/2) + s * eps,
      c_x = sqrt(sigma_next^2 - s^2) / sigma_cur,   c_D = alpha_next - c_x * alpha_cur,

  which is exactly diffusers' ``sde-dpmsolver++`` step at eta = 1 and its (ODE)
  ``dpmsolver++`` step at eta = 0; 0 < eta < 1 interpolates the injected variance,
  keeping the marginal variance of the first-order step (no diffusers counterpart).
  The paper's Table 8 recipe is stochastic (eta = 1) only at the steps that end an HO
  block. Checked against diffusers 0.42 (tests/diffusion/test_chain.py): per step, with
  the same noise, for eta = 1 (SDE), eta = 0 (ODE) and a schedule mixing both (the
  history carried between two schedulers), T = 6 and 16, default and Karras sigmas,
  epsilon prediction; and a whole SDE rollout against ``StableDiffusionPipeline``.
  Not checked: order 3, the heun solver type, v-prediction with DPM (implemented by the
  same conversion as DDIM's, which is checked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch
from torch.func import functional_call, vmap

from ..estimators.chain import State, latent, per_step, with_latent
from ..estimators.plan import Plan, Role

Params = Mapping[str, torch.Tensor]
Denoiser = Callable[[torch.Tensor, int, Params], torch.Tensor]
Schedule = Union[str, float, Sequence[float]]


# ----------------------------------------------------------------------------- solvers
def _fresh(scheduler, T: int):
    """A copy of ``scheduler`` with ``set_timesteps(T)`` (the caller's object is left alone)."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(T)
    return s


@dataclass(frozen=True, eq=False)
class DDIMSolver:
    """DDIM steps of a ``DDIMScheduler`` for T inference steps with per-step ``etas``
    (``etas[t-1]`` for chain step t). Coefficients are computed in float64 from the
    scheduler's ``alphas_cumprod``."""

    T: int
    etas: tuple[float, ...]
    timesteps: torch.Tensor          # timesteps[t-1]: the model timestep of chain step t
    prediction_type: str
    clip: float | None
    coef: tuple[tuple[float, float, float, float], ...]  # (a_t, a_prev, sigma, dir) per step t

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0) -> "DDIMSolver":
        s = _fresh(scheduler, T)
        if getattr(s.config, "thresholding", False):
            raise ValueError("DDIMSolver does not support dynamic thresholding (thresholding=True)")
        etas = per_step(etas, T, "etas")
        ac = s.alphas_cumprod.double()
        coef = []
        for t in range(1, T + 1):
            ts = int(s.timesteps[T - t])
            prev = ts - s.config.num_train_timesteps // T
            a_t = float(ac[ts])
            a_prev = float(ac[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            sig = etas[t - 1] * math.sqrt(var)
            coef.append((a_t, a_prev, sig, math.sqrt(max(1 - a_prev - sig ** 2, 0.0))))
        clip = float(s.config.clip_sample_range) if s.config.clip_sample else None
        return cls(T, etas, s.timesteps.flip(0).clone(), s.config.prediction_type, clip, tuple(coef))

    def initial_state(self, x_T: torch.Tensor) -> State:
        return x_T

    def sigma(self, t: int) -> float:
        return self.coef[t - 1][2]

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        a_t, a_prev, _, direction = self.coef[t - 1]
        x0, eps = _x0_eps(self.prediction_type, x, out, math.sqrt(a_t), math.sqrt(1 - a_t))
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return math.sqrt(a_prev) * x0 + direction * eps


def _x0_eps(prediction_type, x, out, alpha, sigma):
    """(predicted x_0, predicted noise) from x = alpha x_0 + sigma eps and a model output."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass(frozen=True, eq=False)
class DPMSolver:
    """DPM-Solver++(2M) of a ``DPMSolverMultistepScheduler`` (midpoint, order <= 2) with
    per-step ``etas`` (see module docstring). State: (x, previous data prediction)."""

    T: int
    etas: tuple[float, ...]
    timesteps: torch.Tensor
    prediction_type: str
    # per step t: (alpha_cur, sigma_cur, c_x, c_D, noise scale s, order, r0)
    coef: tuple[tuple[float, float, float, float, float, int, float], ...]

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0) -> "DPMSolver":
        s = _fresh(scheduler, T)
        cfg = s.config
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"DPMSolver needs algorithm_type dpmsolver++ or sde-dpmsolver++, got {cfg.algorithm_type}")
        if cfg.solver_order > 2 or cfg.solver_type != "midpoint" or cfg.thresholding \
                or getattr(cfg, "use_flow_sigmas", False):
            raise ValueError("DPMSolver supports solver_order <= 2, solver_type='midpoint', no thresholding, "
                             "no flow sigmas")
        etas = per_step(etas, T, "etas")
        if any(e > 1 for e in etas):
            raise ValueError("DPM-Solver etas must lie in [0, 1] (1 = diffusers' sde-dpmsolver++ step)")
        sig = s.sigmas.double()
        alpha = 1.0 / torch.sqrt(sig ** 2 + 1)
        sg = sig * alpha                      # diffusers' _sigma_to_alpha_sigma_t
        lam = torch.log(alpha) - torch.log(sg)
        coef = []
        for t in range(1, T + 1):
            i = T - t
            last = i == T - 1 and (cfg.euler_at_final or (cfg.lower_order_final and T < 15)
                                   or cfg.final_sigmas_type == "zero")
            order = 1 if (cfg.solver_order == 1 or i == 0 or last) else 2
            a_c, s_c, a_n, s_n = (float(v) for v in (alpha[i], sg[i], alpha[i + 1], sg[i + 1]))
            if s_n == 0.0:       # final step to sigma = 0: x' = D0, no noise
                noise, c_x = 0.0, 0.0
            else:
                h = float(lam[i + 1] - lam[i])
                noise = etas[t - 1] * s_n * math.sqrt(-math.expm1(-2 * h))
                c_x = math.sqrt(max(s_n ** 2 - noise ** 2, 0.0)) / s_c
            r0 = float((lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])) if order == 2 else 1.0
            coef.append((a_c, s_c, c_x, a_n - c_x * a_c, noise, order, r0))
        return cls(T, etas, s.timesteps.flip(0).clone(), cfg.prediction_type, tuple(coef))

    def initial_state(self, x_T: torch.Tensor) -> State:
        return (x_T, torch.zeros_like(x_T))

    def sigma(self, t: int) -> float:
        return self.coef[t - 1][4]

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        a_c, s_c, c_x, c_D, _, order, r0 = self.coef[t - 1]
        z, prev = x
        d0, _ = _x0_eps(self.prediction_type, z, out, a_c, s_c)
        d = d0 if order == 1 else d0 + 0.5 * (d0 - prev) / r0
        return (c_x * z + c_D * d, d0)


def make_solver(scheduler, T: int, etas: Schedule = 0.0):
    """The solver for a diffusers scheduler (DDIM or DPM-Solver multistep)."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return DDIMSolver.from_scheduler(scheduler, T, etas)
    if name == "DPMSolverMultistepScheduler":
        return DPMSolver.from_scheduler(scheduler, T, etas)
    raise ValueError(f"unsupported scheduler {name}; use DDIMScheduler or DPMSolverMultistepScheduler")


# ----------------------------------------------------------------------------- denoiser
@dataclass(frozen=True, eq=False)
class ModuleDenoiser:
    """``denoiser(x, t, params)`` for a diffusers network (UNet2DConditionModel,
    UNet2DModel, UNet3DConditionModel, ...): ``module(x, timestep, encoder_hidden_states=c).sample``.

    Attributes:
      module: the network; its own parameters stay frozen, ``params`` replace some of them
        (by name) through ``functional_call``.
      timesteps: ``timesteps[t-1]`` is the model timestep of chain step t (``solver.timesteps``).
      context: None (unconditional), a tensor ``[N or 1, L, D]`` used at every step, or a
        callable ``t -> tensor`` (per-step conditioning, e.g. different prompts for
        different step ranges).
      negative_context: the unconditional embedding ``[N or 1, L, D]`` for classifier-free guidance.
      guidance_scale: CFG weight w: out = u + w (c - u), as ``StableDiffusionPipeline``
        with ``guidance_rescale=0``; CFG is off when w <= 1 or no negative context is given.
      per_sample: how params with a leading sample axis are applied: ``"vmap"``
        (``torch.func.vmap`` over samples, only the params batched) or ``"loop"`` (one
        call per sample; slower, for modules that vmap cannot trace).
    """

    module: torch.nn.Module
    timesteps: torch.Tensor
    context: None | torch.Tensor | Callable[[int], torch.Tensor] = None
    negative_context: torch.Tensor | None = None
    guidance_scale: float = 1.0
    per_sample: str = "vmap"
    _shapes: dict = field(init=False, repr=False)

    def __post_init__(self):
        if self.per_sample not in ("vmap", "loop"):
            raise ValueError(f"per_sample must be 'vmap' or 'loop', got {self.per_sample!r}")
        object.__setattr__(self, "_shapes", {k: v.shape for k, v in self.module.named_parameters()})

    @property
    def cfg(self) -> bool:
        return self.context is not None and self.negative_context is not None and self.guidance_scale > 1

    def _context(self, t: int, n: int):
        if self.context is None:
            return None, None
        c = self.context(t) if callable(self.context) else self.context
        c = c.expand(n, *c.shape[1:]) if c.shape[0] == 1 else c
        u = None
        if self.cfg:
            u = self.negative_context
            u = u.expand(n, *u.shape[1:]) if u.shape[0] == 1 else u
        if c.shape[0] != n or (u is not None and u.shape[0] != n):
            raise ValueError(f"context has {c.shape[0]} rows but the state has {n} samples")
        return c, u

    def _call(self, params, x, timestep, c, u):
        if c is None:
            return functional_call(self.module, params, (x, timestep)).sample
        if u is None:
            return functional_call(self.module, params, (x, timestep), {"encoder_hidden_states": c}).sample
        out = functional_call(self.module, params, (torch.cat([x, x]), timestep),
                              {"encoder_hidden_states": torch.cat([u, c])}).sample
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def __call__(self, x: torch.Tensor, t: int, params: Params) -> torch.Tensor:
        n = x.shape[0]
        timestep = self.timesteps[t - 1].to(x.device)
        c, u = self._context(t, n)
        unknown = [k for k in params if k not in self._shapes]
        if unknown:
            raise ValueError(f"not parameters of the denoiser's module: {unknown[:3]} (was LoRA added "
                             f"after the denoiser was built?)")
        batched = {k: v.dim() == len(self._shapes[k]) + 1 for k, v in params.items()}
        if not any(batched.values()):
            return self._call(params, x, timestep, c, u)
        for k, v in params.items():
            if batched[k] and v.shape[0] != n:
                raise ValueError(f"per-sample parameter {k} has {v.shape[0]} copies for {n} samples")

        def one(p, xi, ci, ui):
            add = (lambda v: None if v is None else v.unsqueeze(0))
            return self._call(p, xi.unsqueeze(0), timestep, add(ci), add(ui)).squeeze(0)

        if self.per_sample == "loop":
            return torch.stack([one({k: v[i] if batched[k] else v for k, v in params.items()}, x[i],
                                    None if c is None else c[i], None if u is None else u[i]) for i in range(n)])
        dims = {k: 0 if b else None for k, b in batched.items()}
        return vmap(one, in_dims=(dims, 0, None if c is None else 0, None if u is None else 0),
                    randomness="error")(dict(params), x, c, u)


# ----------------------------------------------------------------------------- the chain
@dataclass(frozen=True, eq=False)
class DiffusionChain:
    """A diffusion sampler as a :class:`~halforder.estimators.chain.Chain`.

    ``step(t, x, params)`` is the solver's mean on ``denoiser(latent(x), t, params)``;
    ``sigma(t)`` the solver's noise scale at step t (from its eta); ``tau(t) = taus[t-1]``
    the ZO parameter-noise scale; ``reward(x0)`` is ``reward_fn`` on the final latent.

    Attributes:
      denoiser: ``(x, t, params) -> model output`` (e.g. :class:`ModuleDenoiser`).
      solver: a :class:`DDIMSolver` or :class:`DPMSolver`.
      taus: per-step parameter-noise scales.
      reward_fn: final latent ``[N, ...]`` -> reward ``[N]`` (e.g. :class:`DecodedReward`).
      latent_shape: the shape of one latent, for :meth:`sample_start`.
      init_noise_sigma: the scheduler's start scale (x_T = init_noise_sigma * N(0, I)).
    """

    denoiser: Denoiser
    solver: DDIMSolver | DPMSolver
    taus: tuple[float, ...]
    reward_fn: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, ...]
    init_noise_sigma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "taus", per_step(self.taus, self.solver.T, "taus"))

    @property
    def T(self) -> int:
        return self.solver.T

    def step(self, t: int, x: State, params: Params) -> State:
        return self.solver.step(t, x, self.denoiser(latent(x), t, params))

    def sigma(self, t: int) -> float:
        return self.solver.sigma(t)

    def tau(self, t: int) -> float:
        return self.taus[t - 1]

    def reward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.reward_fn(x0)

    def initial_state(self, x_T: torch.Tensor) -> State:
        """The start state for latents ``x_T`` (a tuple for multistep solvers)."""
        return self.solver.initial_state(x_T)

    def sample_start(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32,
                     device=None) -> State:
        """n start states x_T ~ N(0, init_noise_sigma^2 I)."""
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=dtype, device=device)
        return self.initial_state(z * self.init_noise_sigma)


def rollout(chain, params: Params, x_T: State, *, generator: torch.Generator | None = None,
            noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Sample x_0 from ``x_T`` without gradients: x_{t-1} = step + sigma_t eps_t.

    ``noise[T - t]`` (generation order) gives eps_t; otherwise eps_t is drawn from
    ``generator`` at the steps with sigma_t > 0. Returns the final latent."""
    x = x_T
    with torch.no_grad():
        for t in range(chain.T, 0, -1):
            mean = chain.step(t, x, params)
            sig = float(chain.sigma(t))
            if sig > 0:
                z = latent(mean)
                eps = noise[chain.T - t] if noise is not None else torch.randn(
                    z.shape, generator=generator, dtype=z.dtype, device=z.device)
                mean = with_latent(mean, z + sig * eps)
            x = mean
    return latent(x)


# ----------------------------------------------------------------------------- schedules
def eta_schedule(plan: Plan, eta: Schedule = "plan", ho_eta: float = 1.0) -> tuple[float, ...]:
    """Per-step eta for a plan.

    ``"plan"`` is the paper's recipe (App. G): eta = ``ho_eta`` at the step j that ends
    each HO block (the step whose noise carries the likelihood ratio), eta = 0 elsewhere.
    A number is used at every step; a sequence gives ``eta[t-1]`` for step t."""
    if isinstance(eta, str):
        if eta != "plan":
            raise ValueError(f"unknown eta schedule {eta!r}; use 'plan', a number or one value per step")
        if not ho_eta > 0:
            raise ValueError(f"ho_eta must be > 0, got {ho_eta}")
        ends = {j for j, _ in plan.blocks}
        return tuple(float(ho_eta) if t in ends else 0.0 for t in range(1, plan.T + 1))
    return per_step(eta, plan.T, "eta")


def tau_schedule(plan: Plan, tau: Schedule = "plan", zo_sigma: float = 1e-3) -> tuple[float, ...]:
    """Per-step parameter-noise scale: ``"plan"`` puts ``zo_sigma`` on the ZO steps and 0
    elsewhere; a number is used at every step; a sequence gives ``tau[t-1]``."""
    if isinstance(tau, str):
        if tau != "plan":
            raise ValueError(f"unknown tau schedule {tau!r}; use 'plan', a number or one value per step")
        if not zo_sigma > 0:
            raise ValueError(f"zo_sigma must be > 0, got {zo_sigma}")
        return tuple(float(zo_sigma) if r is Role.ZO else 0.0 for r in plan.roles)
    return per_step(tau, plan.T, "tau")


# ----------------------------------------------------------------------------- SD helpers
def encode_prompts(components, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings ``[N, L, D]`` as ``StableDiffusionPipeline.encode_prompt``
    computes them (max-length padding, last hidden state, no clip skip)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = components.tokenizer(list(prompts), padding="max_length", max_length=components.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
    te = components.text_encoder
    mask = tok.attention_mask.to(te.device) if getattr(te.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return te(tok.input_ids.to(te.device), attention_mask=mask)[0]


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from SD latents, differentiably (as the pipeline's decode + postprocess)."""
    img = vae.decode(z / vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True, eq=False)
class DecodedReward:
    """``reward_fn`` for a chain: latents -> images in [0, 1] -> ``reward(images, prompts)``.

    With ``vae=None`` the state is already an image in [-1, 1] (pixel-space models)."""

    reward: Callable[[torch.Tensor, list], torch.Tensor]
    prompts: tuple[str, ...]
    vae: torch.nn.Module | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        images = (z / 2 + 0.5).clamp(0, 1) if self.vae is None else decode_latents(self.vae, z)
        n, k = len(z), len(self.prompts)
        if k not in (1, n):
            raise ValueError(f"{k} reward prompts for {n} samples; give 1 or {n}")
        return self.reward(images, list(self.prompts) * (n // k))


Prompts = Union[Sequence[str], Callable[[int], Sequence[str]]]


def text_conditioning(components, prompts: Prompts, T: int, guidance_scale: float, negative_prompt: str = ""):
    """Text embeddings for a chain of T steps: ``(context, negative, final_prompts)``.

    ``context`` is one ``[N, L, D]`` tensor for fixed prompts, or a callable ``t -> [N, L, D]``
    when ``prompts`` is a callable ``t -> prompts`` (per-step conditioning; each distinct
    prompt list is encoded once). ``negative`` is the unconditional embedding for
    classifier-free guidance (None when ``guidance_scale <= 1``); ``final_prompts`` are the
    prompts of step 1, the ones a reward sees by default."""
    cache: dict[tuple, torch.Tensor] = {}

    def embed(ps):
        key = tuple(ps)
        if key not in cache:
            cache[key] = encode_prompts(components, key)
        return cache[key]

    if callable(prompts):
        per_step = {t: tuple(prompts(t)) for t in range(1, T + 1)}
        if not all(per_step.values()):
            raise ValueError("prompts(t) must give at least one prompt at every step")
        context, final = (lambda t: embed(per_step[t])), per_step[1]
    else:
        final = tuple([prompts] if isinstance(prompts, str) else prompts)
        if not final:
            raise ValueError("prompts must not be empty")
        context = embed(final)
    negative = embed([negative_prompt]) if guidance_scale > 1 else None
    return context, negative, final


def make_sd_chain(components, plan: Plan, prompts: Prompts, reward: Callable, *, eta: Schedule = "plan",
                  ho_eta: float = 1.0, tau: Schedule = "plan", zo_sigma: float = 1e-3,
                  guidance_scale: float = 7.5, negative_prompt: str = "", reward_prompts: Sequence[str] | None = None,
                  per_sample: str = "vmap") -> DiffusionChain:
    """The Stable Diffusion chain for ``plan`` (T = plan.T inference steps).

    Args:
      components: :class:`~halforder.diffusion.components.Components` (DDIM or DPM scheduler).
      plan: the estimator's plan; it fixes T and, with the ``"plan"`` schedules, where
        eta and tau are non-zero.
      prompts: N prompts used at every step, or a callable ``t -> N prompts`` (per-step
        conditioning, e.g. a diffusive chain of thought with prompts per step range).
        A single prompt is broadcast over any number of samples.
      reward: ``(images [N,3,H,W] in [0,1], prompts) -> [N]`` (see :mod:`.rewards`).
      eta, ho_eta: see :func:`eta_schedule`. The paper uses ``ho_eta = 0.1`` with DDIM;
        ``ho_eta = 1`` with DPM-Solver is diffusers' SDE step.
      tau, zo_sigma: see :func:`tau_schedule`.
      guidance_scale, negative_prompt: classifier-free guidance.
      reward_prompts: the prompts the reward sees (default: the prompts of step 1).
      per_sample: see :class:`ModuleDenoiser`.
    """
    solver = make_solver(components.scheduler, plan.T, eta_schedule(plan, eta, ho_eta))
    context, negative, final = text_conditioning(components, prompts, plan.T, guidance_scale, negative_prompt)
    unet = components.unet
    denoiser = ModuleDenoiser(unet, solver.timesteps, context, negative, guidance_scale, per_sample)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    reward_fn = DecodedReward(reward, tuple(reward_prompts) if reward_prompts is not None else final, components.vae)
    return DiffusionChain(denoiser, solver, tau_schedule(plan, tau, zo_sigma), reward_fn,
                          (unet.config.in_channels, *size), float(components.scheduler.init_noise_sigma))
