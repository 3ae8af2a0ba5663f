"""Diffusers/peft adapters: a Stable Diffusion sampler as a chain, LoRA, rewards.

Needs the ``diffusion`` extra (diffusers, peft, transformers)."""
from .chain import (DDIMSolver, DecodedReward, DiffusionChain, DPMSolver, ModuleDenoiser, decode_latents,
                    encode_prompts, eta_schedule, make_sd_chain, make_solver, rollout, tau_schedule)
from .components import Components, load_components, make_scheduler, tiny_components
from .lora import add_lora, lora_params, save_lora, set_lora
from .preprocess import ClipPreprocess, clip_preprocess
from .rewards import REWARDS, make_reward, register
