"""Model families: SD 1/2 (:mod:`.sd`), SD3 and 3.5 (:mod:`.sd3`), FLUX.1 (:mod:`.flux`), Wan 2.1
text-to-video (:mod:`.wan`), Qwen-Image (:mod:`.qwen_image`), SANA (:mod:`.sana`).

:func:`load_components` reads a folder's or hub id's ``model_index.json`` and loads the
family its pipeline class names; :func:`tiny_model` builds a family's tiny random parts;
:func:`family_of` gives the :class:`~.protocol.ModelFamily` of loaded parts, which the chain
builder asks how to encode prompts, call the network and schedule the sampler. A new family
is one module and one entry in :data:`FAMILIES`.
"""
from __future__ import annotations

import functools
import json
import os

import torch

from ..components import Components
from ..hub import load_error, local_dir, looks_local, offline
from ..text import PromptEncoder
from . import flux, qwen_image, sana, sd, sd3, wan
from .protocol import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (sd.FAMILY, sd3.FAMILY, flux.FAMILY, wan.FAMILY,
                                                         qwen_image.FAMILY, sana.FAMILY)}
TINY_MODELS: dict[str, ModelFamily] = {f.tiny_model: f for f in FAMILIES.values()}


def family_of(components: Components) -> ModelFamily:
    """The family of loaded or tiny parts (``components.family``)."""
    try:
        return FAMILIES[components.family]
    except KeyError:
        raise ValueError(f"unknown model family {components.family!r}; known: {', '.join(FAMILIES)}") from None


def pipeline_class(model: str, kw: dict) -> str | None:
    """The ``_class_name`` of ``model``'s ``model_index.json`` (None: a local folder without one)."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    from diffusers import DiffusionPipeline
    try:
        return DiffusionPipeline.load_config(model, **kw).get("_class_name")
    except (OSError, ValueError) as e:
        raise load_error("the model index (model_index.json)", model, e) from e


def load_components(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    local_files_only: bool = False, revision: str | None = None, scheduler: str = "ddim",
                    t5: bool = True, video: bool = False) -> Components:
    """Load a model's parts with ``from_pretrained``, its family read from ``model_index.json``
    (a local folder without one is taken for SD 1/2, or with ``video`` for a UNet3D model).

    Args:
      model: a hub id (``"stabilityai/stable-diffusion-3.5-medium"``) or a local directory in
        the diffusers layout.
      dtype, device: where the modules live; every module is frozen.
      local_files_only: never touch the network (implied by ``HF_HUB_OFFLINE=1``).
      revision: a hub revision.
      scheduler: SD 1/2: ``"ddim"`` or ``"dpm"``; flow-matching models keep their own
        scheduler and refuse ``"dpm"``.
      t5: SD3: load the T5 encoder (False: the pipeline's zeros in its place, about 9.5 GB less
        in bf16 for SD3.5's T5-XXL).
      video: a text-to-video model is expected: Wan 2.1 (``WanPipeline``) or a UNet3D model
        (``TextToVideoSDPipeline``, loaded by :func:`~halforder.diffusion.video.load_video_components`).

    Raises:
      FileNotFoundError: ``model`` looks like a path but does not exist or lacks a part.
      OSError: the model could not be loaded (offline without a cached copy, a typo in the
        hub id, ...); the message says how to point at a local copy.
      ValueError: a pipeline class no family loads.
    """
    if looks_local(model):
        model = local_dir(model, "model")
    kw = dict(local_files_only=local_files_only or offline(), revision=revision)
    name = pipeline_class(model, kw)
    family = next((f for f in FAMILIES.values() if name in f.pipelines), sd.FAMILY if name is None else None)
    if family is None:
        known = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
        raise ValueError(f"{model!r} is a {name}; the model families here load {known}")
    made = family.pipelines.get(name, "t2v" if video else "t2i")
    if made != ("t2v" if video else "t2i"):
        raise ValueError(f"{model!r} is a {name}, a {'text-to-video' if made == 't2v' else 'text-to-image'} model: "
                         f"use task {made}")
    check_t5(family, t5, f"{model!r} (a {name})")
    return family.load(model, dtype=dtype, kw=kw, scheduler=scheduler, t5=t5, video=video).to(device).freeze()


def check_t5(family: ModelFamily, t5: bool, what: str) -> None:
    """The one rule of ``no_t5``: only SD3 runs without its T5 encoder (``ValueError`` naming ``what``)."""
    if not t5 and family is not sd3.FAMILY:
        raise ValueError(f"no_t5 applies to SD3 models; {what} is not one")


def tiny_model(name: str, seed: int = 0, scheduler: str = "ddim") -> Components:
    """The tiny random parts of the family whose tiny model is ``name`` (``"tiny"``,
    ``"tiny-sd3"``, ``"tiny-flux"``, ``"tiny-wan"``, ``"tiny-qwen-image"``, ``"tiny-sana"``), built offline."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    return TINY_MODELS[name].tiny(seed, scheduler=scheduler)


def prompt_encoder(components: Components) -> PromptEncoder | None:
    """A caching prompt encoder for ``components`` (None for an unconditional model)."""
    if components.text_encoder is None:
        return None
    return PromptEncoder(functools.partial(family_of(components).encode, components))
