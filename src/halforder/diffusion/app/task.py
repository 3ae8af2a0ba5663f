"""The one diffusion training task: images, video and per-step prompts (DCoT) alike.

A :class:`DiffusionTask` is what :func:`halforder.training.loop.train` trains: the frozen
components with a LoRA adapter, a reward, and a *view* that says what the reward sees of
the final latent (:mod:`~halforder.diffusion.models.sd_chain`: images;
:mod:`~halforder.diffusion.models.video.frames`: frames). Its chains are built once per batch
of prompts by :func:`~halforder.diffusion.models.sd_chain.make_chain` (each prompt encoded
once per run) and given each plan's noise scales (:meth:`DiffusionChain.for_plan`). Optional per-step
prompts (``step_prompts``, e.g. DCoT) condition each step on its own prompt while the
reward sees the original one; gradient checkpointing wraps every chain.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ...estimators import Plan
from ...estimators.gradient_checkpointing import Checkpointed
from ..sampling.chain import DiffusionChain, NoiseScales, rollout
from ..models.components import Components
from ..models.families import family_of, flow_noise, prompt_encoder, with_noise
from ..models.lora import save_lora
from ..models.sd_chain import make_chain, model_solver
from ..sampling.views import Reward, View
from ..sampling.text import PromptEncoder

StepPrompts = Callable[[Sequence[str]], Callable[[int], Sequence[str]]]


@dataclass(frozen=True, eq=False)
class DiffusionTask:
    """A diffusion model's LoRA adapter trained on a reward (the training loop's ``Task``).

    Attributes (those after ``T`` are keywords only):
      components: the frozen parts; ``components.unet`` carries the adapter.
      params: the adapter weights by name (the trainable parameters).
      reward: ``(what the view decodes, prompts) -> [N]``.
      view: :class:`~halforder.diffusion.sampling.views.ImageView` or
        :class:`~halforder.diffusion.models.video.frames.VideoView`.
      T: sampler steps of the chain.
      guidance_scale, negative_prompt: classifier-free guidance.
      noise_scales: the chain's noise settings, which each plan's chain gets
        (:meth:`DiffusionChain.for_plan`); the default has a run config's ``eta_plan``, 0.1.
      gradient_checkpointing: recompute each step's graph in backward.
      step_prompts: None, or ``prompts -> (t -> prompts)``: per-step conditioning (DCoT).
      batching: how per-sample parameters are applied (``"vmap"`` or ``"loop"``).
      compile: None, or a ``torch.compile`` mode for the denoiser.
      noise: a flow-matching model's noise family where eta > 0 (``"sde"`` or ``"cps"``), which
        lives in the options record of ``components`` (``components.options.noise``, set by a run's
        ``noise`` setting): None keeps the record's; a value replaces it there (the task's
        ``components`` then carry it). After construction it reads the record's.
    """

    components: Components
    params: dict[str, torch.nn.Parameter]
    reward: Reward
    view: View
    T: int
    _: KW_ONLY
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    noise_scales: NoiseScales = NoiseScales(eta_plan=0.1)
    gradient_checkpointing: bool = False
    step_prompts: StepPrompts | None = None
    batching: str = "vmap"
    compile: str | None = None
    noise: str | None = None
    _encoder: PromptEncoder | None = field(init=False, repr=False)
    _solver: object = field(init=False, repr=False)

    def __post_init__(self):
        c = self.components if self.noise is None else with_noise(self.components, self.noise)
        object.__setattr__(self, "components", c)
        object.__setattr__(self, "noise", flow_noise(c))
        object.__setattr__(self, "_encoder", prompt_encoder(c))
        object.__setattr__(self, "_solver", model_solver(c, self.T, self.view.latent_shape))

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.params

    def base_chain(self, prompts: Sequence[str], generator: torch.Generator | None = None) -> DiffusionChain:
        """The chain for a batch of prompts, without noise (eta = 0, tau = 0)."""
        prompts = list(prompts)
        conditioning = self.step_prompts(prompts) if self.step_prompts is not None else prompts
        return make_chain(self.components, self.T, conditioning, self.reward, view=self.view,
                          guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt,
                          reward_prompts=prompts, batching=self.batching, encoder=self._encoder,
                          solver=self._solver, generator=generator, compile=self.compile)

    def chain(self, plan: Plan, prompts: Sequence[str], generator: torch.Generator | None = None):
        """The chain of ``plan`` for a batch of prompts (checkpointed if asked); ``ValueError``
        for a plan with first-order steps when the reward has no gradient (``differentiable =
        False``)."""
        if plan.fo_steps and not getattr(self.reward, "differentiable", True):
            raise ValueError(f"the reward has no gradient, but plan {plan} backpropagates through it on "
                             f"{plan.fo_steps} first-order steps: use a plan without FO steps (estimator "
                             f"reinforce, zeroth_order or rlr_no_fo)")
        chain = self.base_chain(prompts, generator).for_plan(plan, self.noise_scales)
        return Checkpointed(chain) if self.gradient_checkpointing else chain

    def sample(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Final latents of the deterministic sampler (eta = 0) with the current weights."""
        chain = self.base_chain(prompts)
        return rollout(chain, {}, chain.sample_start(len(prompts), generator))

    def previews(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] of :meth:`sample`, for sample grids."""
        return self.view.preview(self.sample(prompts, generator))

    def evaluate(self, prompts: Sequence[str], generator: torch.Generator, others: Mapping[str, Reward] = {}):
        """The previews of :meth:`sample` (the same images as :meth:`previews`), each sample's
        reward ``[N]`` (for video with random frames, frames drawn from a fixed seed) and, by
        name, each of the rewards ``others`` on the same samples (e.g. a CLIP score beside the
        trained reward)."""
        z = self.sample(prompts, generator)
        with torch.no_grad():
            values = {k: self.view.reward_fn(r, list(prompts), None)(z).float() for k, r in others.items()}
            return self.view.preview(z), self.base_chain(prompts).reward(z).float(), values

    def save_adapter(self, directory: str) -> None:
        """The LoRA adapter in the layout ``load_lora_weights`` reads."""
        save_lora(self.components.unet, directory, prefix=family_of(self.components).lora_prefix)
