"""LoRA adapters on a diffusers UNet through peft: the trainable parameters theta.

``add_lora`` freezes the UNet and adds an adapter (``unet.add_adapter(LoraConfig(...))``);
``lora_params`` returns exactly the adapter weights by name, the ``params`` dict the
estimators differentiate and perturb; ``save_lora`` writes them in the layout that
``StableDiffusionPipeline.load_lora_weights(directory)`` reads
(``pytorch_lora_weights.safetensors``, with the adapter's rank and alpha as metadata).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, init: str | bool = True,
             adapter_name: str = "default", seed: int | None = None) -> dict[str, torch.nn.Parameter]:
    """Freeze ``unet`` and add a LoRA adapter; returns :func:`lora_params`.

    Uses ``unet.add_adapter`` (diffusers' peft integration) where the model has it, and
    ``peft.inject_adapter_in_model`` otherwise.

    Args:
      rank, alpha: LoRA rank k and scale alpha (the update is (alpha / k) B A; alpha = k if None).
      target_modules: module names to adapt (the attention projections by default;
        the paper adapts every linear layer of the backbone with k = 16).
      init: peft's ``init_lora_weights``: True (B = 0, so the adapted UNet starts equal to
        the base one), ``"gaussian"``, or False (random B, for tests).
      seed: seeds peft's random initialisation in a forked RNG, so the global torch RNG is
        left alone; None draws from the global RNG.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                        target_modules=list(target_modules), init_lora_weights=init)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(config, adapter_name=adapter_name)
        else:  # diffusers models without the peft mixin (e.g. UNet3DConditionModel)
            from peft import inject_adapter_in_model
            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    params = lora_params(unet)
    if not params:
        raise ValueError(f"no module of the UNet matches target_modules={list(target_modules)}")
    return params


def lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA adapter weights of ``unet`` by name (as ``functional_call`` takes them)."""
    return {n: p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def set_lora(unet: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copy ``values`` (name -> tensor) into the UNet's LoRA weights in place."""
    params = lora_params(unet)
    unknown = set(values) - set(params)
    if unknown:
        raise ValueError(f"not LoRA parameters of this UNet: {sorted(unknown)[:3]}...")
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> str:
    """Save the adapter so that ``StableDiffusionPipeline.load_lora_weights(directory)``
    loads it; returns the path of the safetensors file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin   # the pipeline's module would import CLIP's
    from diffusers.utils import convert_state_dict_to_diffusers    # image processor, and transformers warn
    from peft.utils import get_peft_model_state_dict

    if not lora_params(unet):
        raise ValueError("the UNet has no LoRA adapter to save")
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}
    metadata = unet.peft_config[adapter_name].to_dict()
    StableDiffusionLoraLoaderMixin.save_lora_weights(directory, unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    return os.path.join(os.fspath(directory), "pytorch_lora_weights.safetensors")
