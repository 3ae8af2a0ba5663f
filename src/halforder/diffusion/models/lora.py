"""LoRA adapters on a diffusers UNet or transformer through peft: the trainable parameters theta.

``add_lora`` freezes the UNet and adds an adapter (``unet.add_adapter(LoraConfig(...))``)
whose weights are float32 whatever the base's dtype; ``lora_params`` returns exactly the
adapter weights by name, the ``params`` dict the estimators differentiate and perturb;
``layer_names`` lists every module of given types (e.g. every linear layer and conv, the
paper's recipe) as exact target names.

Loading a trained LoRA. ``save_lora(unet, directory)`` writes
``directory/pytorch_lora_weights.safetensors``: the adapter weights under peft's own names
(``unet.<module path>.lora_A.weight`` / ``lora_B.weight``, for every adapted module: attention,
``proj_in``/``proj_out``, feed-forward, convs, any linear layer) and the adapter's
``LoraConfig`` (rank, alpha, target modules) as metadata. For an image UNet,
``StableDiffusionPipeline.load_lora_weights(directory)`` loads it exactly; for a transformer
(``prefix="transformer"``) so do ``StableDiffusion3Pipeline`` and ``FluxPipeline``. For any UNet,
``UNet3DConditionModel`` included (whose ``TextToVideoSDPipeline`` cannot load LoRA),
``load_lora(unet, directory)`` restores the adapter into a UNet built from the same base
weights and returns its parameters, as ``add_lora`` does (e.g. to sample or to go on training).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_PREFIXES = ("unet", "transformer")  # the prefixes the pipelines' save_lora_weights give the network's keys


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, init: str | bool = True,
             adapter_name: str = "default", seed: int | None = None) -> dict[str, torch.nn.Parameter]:
    """Freeze ``unet`` and add a LoRA adapter with float32 weights; returns :func:`lora_params`.

    Uses ``unet.add_adapter`` (diffusers' peft integration) where the model has it, and
    ``peft.inject_adapter_in_model`` otherwise. peft creates the adapter in the dtype of the
    layer it adapts; its weights are then cast to float32 (diffusers' ``cast_training_params``),
    so a bf16 or fp16 base trains float32 LoRA weights (peft casts each layer's input to the
    adapter's dtype and its output back to the base's).

    Args:
      rank, alpha: LoRA rank k and scale alpha (the update is (alpha / k) B A; alpha = k if None).
      target_modules: module names to adapt (the attention projections by default); a name
        matches a module whose path equals it or ends with ``.name``. For every linear layer
        and conv (the paper adapts every linear layer of the backbone, with k = 16) pass
        :func:`layer_names`, which gives exact paths.
      init: peft's ``init_lora_weights``: True (B = 0, so the adapted UNet starts equal to
        the base one), ``"gaussian"``, or False (random B, for tests).
      seed: seeds peft's random initialisation in a forked RNG, so the global torch RNG is
        left alone; None draws from the global RNG.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                        target_modules=list(target_modules), init_lora_weights=init)
    return _inject(unet, config, adapter_name, seed)


def _inject(unet: torch.nn.Module, config, adapter_name: str, seed: int | None = None):
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(config, adapter_name=adapter_name)
        else:  # diffusers models without the peft mixin (e.g. UNet3DConditionModel)
            from peft import inject_adapter_in_model
            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    if not lora_params(unet):
        raise ValueError(f"no module of the UNet matches target_modules={sorted(config.target_modules)}")
    cast_training_params(unet, dtype=torch.float32)  # only the adapter requires grad
    return lora_params(unet)


def layer_names(unet: torch.nn.Module, types: Sequence[type] = (torch.nn.Linear, torch.nn.Conv2d)) -> list[str]:
    """The paths of every module of ``unet`` that is an instance of ``types``, as ``target_modules``
    (exact: a short name such as ``conv1`` also matches the UNet3D's ``temp_convs.*.conv1``
    blocks, which peft cannot adapt). ``(torch.nn.Linear,)`` gives every linear layer; add
    ``torch.nn.Conv3d`` for the UNet3D's temporal convolutions."""
    return [n for n, m in unet.named_modules() if n and isinstance(m, tuple(types))]


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


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
              prefix: str = "unet") -> str:
    """Save the adapter so that the pipelines' ``load_lora_weights(directory)`` and
    :func:`load_lora` load it exactly; returns the path of the file. ``prefix``: ``"unet"``
    (``StableDiffusionPipeline``) or ``"transformer"`` (``StableDiffusion3Pipeline``,
    ``FluxPipeline``).

    The keys are peft's (``<prefix>.<module path>.lora_A.weight``), unconverted: diffusers' loader
    picks the key format from the first key, so a file whose attention keys alone were renamed
    to diffusers' format would load only part of the adapter for other targets, silently."""
    from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin   # not the pipelines' modules,
                                                                                        # which import CLIP's image
                                                                                        # processor (warnings)
    from peft.utils import get_peft_model_state_dict

    if prefix not in LORA_PREFIXES:
        raise ValueError(f"prefix must be one of {LORA_PREFIXES}, got {prefix!r}")
    if not lora_params(unet):
        raise ValueError("the network has no LoRA adapter to save")
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = unet.peft_config[adapter_name].to_dict()
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in metadata.items()}  # same bytes
    writer = StableDiffusionLoraLoaderMixin if prefix == "unet" else SD3LoraLoaderMixin   # same file format as FLUX's
    writer.save_lora_weights(directory, safe_serialization=True, **{f"{prefix}_lora_layers": state,
                                                                    f"{prefix}_lora_adapter_metadata": metadata})
    path = os.path.join(os.fspath(directory), LORA_FILE)
    _sort_header_metadata(path)
    return path


def _sort_header_metadata(path: str) -> None:
    """Rewrite the header of the safetensors file ``path`` in place with its ``__metadata__``
    entries sorted by name: safetensors writes them in a hash order that varies from one process
    to the next, so that identical adapters would give files that differ."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:                       # the same entries: the same length, padded as safetensors pads
            f.seek(8)
            f.write(text.ljust(size))


def load_lora(unet: torch.nn.Module, path: str | os.PathLike,
              adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """Restore the adapter that :func:`save_lora` wrote (``path``: its directory or file) into
    ``unet``, a UNet built from the same base weights (2D, UNet3D or FPSUNet3D); returns
    :func:`lora_params`, float32 and trainable, as :func:`add_lora` does.

    Files written before ``save_lora`` kept peft's key names (attention keys in diffusers'
    format) load too. Raises ``FileNotFoundError`` without the file and ``ValueError`` when
    it has no adapter config or its weights do not match the adapter it describes."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open

    path = os.fspath(path)
    file = os.path.join(path, LORA_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no LoRA file at {file}")
    with safe_open(file, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
        keys = list(f.keys())
        prefix = next((p + "." for p in LORA_PREFIXES if keys and all(k.startswith(p + ".") for k in keys)), "")
        state = {k.removeprefix(prefix): f.get_tensor(k) for k in keys} if prefix else {}
    config = {k.removeprefix(prefix): v for k, v in meta.items() if prefix and k.startswith(prefix)}
    if not config or not state:
        raise ValueError(f"{file} holds no UNet or transformer LoRA adapter with its config (was it written by "
                         "save_lora?)")
    params = _inject(unet, LoraConfig(**config), adapter_name)
    ours = {n for n in params if f".{adapter_name}." in n}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if k in ours]
    if result.unexpected_keys or missing or len(state) != len(ours):
        raise ValueError(f"{file} does not match its adapter: {len(state)} tensors for {len(ours)} LoRA "
                         f"weights; unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
    return params
