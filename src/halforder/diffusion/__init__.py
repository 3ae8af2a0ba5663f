"""Diffusion models as chains, and reward fine-tuning of their LoRA adapters.

Needs the ``diffusion`` extra (diffusers, peft, transformers, accelerate). Four layers, each
importing only those below it:

1. :mod:`.sampling`, the chain machinery, model-agnostic: ``solvers`` (DDIM, DPM-Solver,
   flow-matching Euler), ``denoiser`` (functional call, CFG, per-sample parameters), ``chain``
   (the chain and its noise schedules), ``text`` (prompt embeddings), ``views`` (what the
   reward sees).
2. :mod:`.models`, the models: ``components`` (the parts of a model, SD 1/2 loading and tiny
   models), ``families`` (SD 1/2, SD3, FLUX, Wan, ...: loading by model_index.json),
   ``model_options``, ``hub`` (offline behaviour), ``lora``, ``sd_chain`` (the chain builder)
   and ``video`` (UNet3D models, frames and the video view).
3. :mod:`.rewards`, the rewards: the image rewards and their registry (the package itself),
   ``clip_preprocess``, ``open_clip_weights``, ``ocr`` and ``video`` (rewards on frames).
4. :mod:`.app`, the application: ``task`` (the training task), ``dcot``, ``config``, ``run``
   and ``cli`` (a run from a config), ``plan_choice`` and ``plan_cli``, ``export_cli`` (a
   checkpoint's LoRA file), ``diagnose_cli`` and ``previews`` (sample grids and GIFs).

The names below are the public ones, importable from here.
"""
from .sampling.chain import DiffusionChain, NoiseScales, eta_schedule, rollout, tau_schedule
from .sampling.denoiser import ModuleDenoiser
from .sampling.solvers import DDIMSolver, DPMSolver, FlowMatchSolver, LatentScale, make_solver
from .sampling.text import PromptEncoder, encode_prompts, text_conditioning
from .sampling.views import DecodedReward, ImageView, decode_latents
from .models.components import Components, make_scheduler, tiny_components, unet_latent_shape
from .models.families import family_of, load_components, tiny_model
from .models.lora import add_lora, lora_params, save_lora, set_lora
from .models.sd_chain import image_view, make_chain, model_solver
from .rewards import REWARDS, make_reward, register
from .app.task import DiffusionTask

__all__ = ["Components", "DDIMSolver", "DPMSolver", "DecodedReward", "DiffusionChain", "DiffusionTask",
           "FlowMatchSolver", "ImageView", "LatentScale", "ModuleDenoiser", "NoiseScales", "PromptEncoder", "REWARDS",
           "add_lora", "decode_latents", "encode_prompts", "eta_schedule", "family_of", "image_view",
           "load_components", "lora_params", "make_chain", "make_reward", "make_scheduler", "make_solver",
           "model_solver", "register", "rollout", "save_lora", "set_lora", "tau_schedule",
           "text_conditioning", "tiny_components", "tiny_model", "unet_latent_shape"]
