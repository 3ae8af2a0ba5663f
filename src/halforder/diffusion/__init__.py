"""Diffusion models as chains, and reward fine-tuning of their LoRA adapters.

Needs the ``diffusion`` extra (diffusers, peft, transformers, accelerate). One idea a module:
:mod:`.solvers` (DDIM, DPM-Solver, flow-matching Euler), :mod:`.denoiser` (functional call,
CFG, per-sample parameters), :mod:`.chain` (the chain and its noise schedules), :mod:`.text`
(prompt embeddings), :mod:`.sd_chain` (the chain builder), :mod:`.views` (what the reward sees),
:mod:`.components` (the parts of a model, SD 1/2 loading and tiny models), :mod:`.families`
(SD 1/2, SD3, FLUX, Wan: loading by model_index.json), :mod:`.hub` (offline behaviour),
:mod:`.lora`, :mod:`.rewards` and :mod:`.clip_preprocess`, :mod:`.task` (the training task),
:mod:`.dcot`, :mod:`.config`, :mod:`.run` and :mod:`.cli` (a run from a config),
:mod:`.export_cli` (a checkpoint's LoRA file), :mod:`.previews` (sample grids and GIFs), and
:mod:`.video`.
"""
from .chain import DiffusionChain, NoiseScales, eta_schedule, rollout, tau_schedule
from .components import Components, make_scheduler, tiny_components, unet_latent_shape
from .denoiser import ModuleDenoiser
from .families import family_of, load_components, tiny_model
from .lora import add_lora, lora_params, save_lora, set_lora
from .rewards import REWARDS, make_reward, register
from .solvers import DDIMSolver, DPMSolver, FlowMatchSolver, LatentScale, make_solver
from .sd_chain import image_view, make_chain, model_solver
from .views import DecodedReward, ImageView, decode_latents
from .task import DiffusionTask
from .text import PromptEncoder, encode_prompts, text_conditioning

__all__ = ["Components", "DDIMSolver", "DPMSolver", "DecodedReward", "DiffusionChain", "DiffusionTask",
           "FlowMatchSolver", "ImageView", "LatentScale", "ModuleDenoiser", "NoiseScales", "PromptEncoder", "REWARDS",
           "add_lora", "decode_latents", "encode_prompts", "eta_schedule", "family_of", "image_view",
           "load_components", "lora_params", "make_chain", "make_reward", "make_scheduler", "make_solver",
           "model_solver", "register", "rollout", "save_lora", "set_lora", "tau_schedule",
           "text_conditioning", "tiny_components", "tiny_model", "unet_latent_shape"]
