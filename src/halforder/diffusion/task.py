"""The Stable Diffusion side of training: a :class:`~halforder.diffusion.trainer.Task`.

``SDTask`` turns (plan, prompts) into the SD chain of :func:`make_sd_chain` (DDIM or
DPM-Solver, eta and tau following the plan), draws start latents, renders evaluation
samples with the deterministic sampler (eta = 0) and exports the LoRA adapter.
:func:`build_task` assembles one from a :class:`TrainConfig`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..estimators import Plan
from .chain import decode_latents, make_sd_chain, rollout
from .checkpointing import Checkpointed
from .components import Components, load_components, tiny_components
from .config import TINY_MODEL, TrainConfig
from .lora import add_lora, save_lora


@dataclass(frozen=True, eq=False)
class SDTask:
    """Stable Diffusion with a LoRA adapter, trained on a reward.

    Attributes:
      components: the frozen SD parts; ``components.unet`` carries the adapter.
      params: the adapter weights by name (the trainable parameters).
      reward: ``(images [N,3,H,W] in [0,1], prompts) -> [N]``.
      T: sampler steps of the chain.
      guidance_scale, eta, eta_plan, zo_sigma, negative_prompt, gradient_checkpointing: see
        :class:`TrainConfig` (``eta_plan`` is the eta at HO block ends with the ``"plan"`` schedule).
      device: where start latents are drawn.
    """

    components: Components
    params: dict[str, torch.nn.Parameter]
    reward: Callable
    T: int
    guidance_scale: float = 7.5
    eta: float | str = "plan"
    eta_plan: float = 0.1
    zo_sigma: float = 1e-3
    negative_prompt: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gradient_checkpointing: bool = False

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.params

    def chain(self, plan: Plan, prompts: Sequence[str]):
        chain = make_sd_chain(self.components, plan, list(prompts), self.reward, eta=self.eta, ho_eta=self.eta_plan,
                              zo_sigma=self.zo_sigma, guidance_scale=self.guidance_scale,
                              negative_prompt=self.negative_prompt)
        return Checkpointed(chain) if self.gradient_checkpointing else chain

    def start(self, chain, n: int, generator: torch.Generator):
        return chain.sample_start(n, generator, device=self.device)

    def images(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        chain = make_sd_chain(self.components, Plan.full(self.T), list(prompts), self.reward, eta=0.0, tau=0.0,
                              guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt)
        z = rollout(chain, {}, chain.sample_start(len(prompts), generator, device=self.device))
        with torch.no_grad():
            return decode_latents(self.components.vae, z)

    def save_adapter(self, directory: str) -> None:
        save_lora(self.components.unet, directory)


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a text file (ValueError if it is missing or has none)."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path!r} is empty: put one prompt per line")
    return prompts


def build_components(cfg: TrainConfig, device: torch.device | str = "cpu") -> Components:
    """The frozen SD parts ``cfg.model`` names (``"tiny"``: random tiny parts, no download)."""
    if cfg.model == TINY_MODEL:
        comp = tiny_components(cfg.seed, scheduler=cfg.scheduler)
        for m in (comp.unet, comp.vae, comp.text_encoder):
            m.to(device)
        return comp
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return load_components(cfg.model, device=device, revision=cfg.revision, scheduler=cfg.scheduler,
                           local_files_only=offline)


def build_task(cfg: TrainConfig, reward: Callable, components: Components,
               device: torch.device | str = "cpu") -> SDTask:
    """Add the LoRA adapter of ``cfg`` to ``components.unet`` and wrap everything as a task."""
    params = add_lora(components.unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    for p in params.values():
        p.data = p.data.to(device)
    return SDTask(components, params, reward, cfg.T, cfg.guidance_scale, cfg.eta, cfg.eta_plan, cfg.zo_sigma,
                  device=torch.device(device), gradient_checkpointing=cfg.gradient_checkpointing)
