"""Model families: SD 1/2 (:mod:`.sd`), SD3 and 3.5 (:mod:`.sd3`), FLUX.1 (:mod:`.flux`), Wan 2.1
text-to-video (:mod:`.wan`), Qwen-Image (:mod:`.qwen_image`), SANA (:mod:`.sana`), VideoCrafter2
(:mod:`.videocrafter2`).

:func:`load_components` reads a folder's or hub id's ``model_index.json`` and loads the
family its pipeline class names (or the family a run names); :func:`tiny_model` builds a family's
tiny random parts; both build the family's options from settings by name (:func:`options_of`)
and let the family adjust its parts to them. :func:`family_of` gives the
:class:`~.protocol.ModelFamily` of loaded parts, which the chain builder asks how to encode
prompts, call the network and schedule the sampler. A new family is one module and one entry in
:data:`FAMILIES`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch

from ..components import Components
from ..hub import load_error, local_dir, looks_local, offline
from ..model_options import make_options, settings_of
from ...sampling.text import PromptEncoder
from . import flux, qwen_image, sana, sd, sd3, videocrafter2, wan
from .protocol import ModelFamily, flow_noise

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (sd.FAMILY, sd3.FAMILY, flux.FAMILY, wan.FAMILY,
                                                         qwen_image.FAMILY, sana.FAMILY, videocrafter2.FAMILY)}
TINY_MODELS: dict[str, ModelFamily] = {f.tiny_model: f for f in FAMILIES.values()}
#: every setting some family takes as an option, by name (the field of the first family declaring it)
OPTION_SETTINGS = settings_of(f.options for f in FAMILIES.values())


def family_of(components: Components) -> ModelFamily:
    """The family of loaded or tiny parts (``components.family``)."""
    return named_family(components.family)


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


def named_family(name: str) -> ModelFamily:
    """The family called ``name`` (``ValueError`` naming the known ones)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def options_of(family: ModelFamily, what: str = "the model", **settings):
    """``family``'s options record from run settings by name (``t5=False``, ``scheduler="dpm"``,
    ``shift=3.0``, ...): a setting the family does not take is refused unless at its default, with a
    ``ValueError`` naming it, ``what`` and the family
    (:func:`~halforder.diffusion.models.model_options.make_options`)."""
    return make_options(family.options, family.title, what, settings, OPTION_SETTINGS)


def adjusted(family: ModelFamily, components: Components, options) -> Components:
    """The family's parts adjusted to its options (:attr:`~.protocol.ModelFamily.adjust`), carrying them."""
    return dataclasses.replace(family.adjust(components, options), options=options)


def with_noise(components: Components, noise: str, what: str = "the model") -> Components:
    """The parts with the flow noise family ``noise`` (``"sde"`` or ``"cps"``) in their options
    record, which their family's ``solver`` reads; unchanged where it already says so. Parts put
    together by hand (no record) get their family's default record with it. ``ValueError`` where the
    family takes no ``noise`` (UNet models, SANA), as :func:`options_of` refuses it."""
    if noise == flow_noise(components):
        return components
    family = family_of(components)
    options = components.options if components.options is not None else options_of(family, what)
    if "noise" not in {f.name for f in dataclasses.fields(options)}:
        options_of(family, what, noise=noise)
    return dataclasses.replace(components, options=dataclasses.replace(options, noise=noise))


def load_components(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    local_files_only: bool = False, revision: str | None = None, video: bool = False,
                    family: str | None = None, **settings) -> Components:
    """Load a model's parts with ``from_pretrained``, its family read from ``model_index.json``
    (a local folder without one is taken for SD 1/2, or with ``video`` for a UNet3D model) or named.

    Args:
      model: a hub id (``"stabilityai/stable-diffusion-3.5-medium"``) or a local directory in
        the diffusers layout.
      dtype, device: where the modules live; every module is frozen.
      local_files_only: never touch the network (implied by ``HF_HUB_OFFLINE=1``).
      revision: a hub revision.
      video: a text-to-video model is expected: Wan 2.1 (``WanPipeline``), a UNet3D model
        (``TextToVideoSDPipeline``) or VideoCrafter2.
      family: the family's name where ``model`` does not say it (``"videocrafter2"``: ``model`` is its
        converted UNet); None: read from ``model_index.json``.
      settings: the family's options by name (:func:`options_of`): ``scheduler`` (SD 1/2: ``"ddim"``
        or ``"dpm"``), ``t5`` (SD3: False leaves T5 out, about 9.5 GB less in bf16 for SD3.5),
        ``shift`` and ``noise`` (flow-matching models: the scheduler's shift, ``"sde"`` or ``"cps"``
        sampling), ``fps`` and ``video_base`` (VideoCrafter2).

    Raises:
      FileNotFoundError: ``model`` looks like a path but does not exist or lacks a part.
      OSError: the model could not be loaded (offline without a cached copy, a typo in the
        hub id, ...); the message says how to point at a local copy.
      ValueError: a pipeline class no family loads; an option the family does not take.
    """
    kw = dict(local_files_only=local_files_only or offline(), revision=revision)
    if family is None:
        if looks_local(model):
            model = local_dir(model, "model")
        name = pipeline_class(model, kw)
        found = next((f for f in FAMILIES.values() if name in f.pipelines), sd.FAMILY if name is None else None)
        if found is None:
            known = ", ".join(dict.fromkeys(p for f in FAMILIES.values() for p in f.pipelines))
            raise ValueError(f"{model!r} is a {name}; the model families here load {known}")
    else:
        found, name = named_family(family), None
    name = name if name is not None else found.pipeline_for(video)
    made = found.pipelines[name]
    if made != ("t2v" if video else "t2i"):
        raise ValueError(f"{model!r} is a {name}, a {'text-to-video' if made == 't2v' else 'text-to-image'} model: "
                         f"use task {made}")
    options = options_of(found, repr(model), **settings)
    comp = found.load(model, pipeline_class=name, options=options, dtype=dtype, kw=kw).to(device).freeze()
    return adjusted(found, comp, options)


def tiny_model(name: str, seed: int = 0, *, video: bool = False, family: str | None = None,
               **settings) -> Components:
    """The tiny random parts of the family whose tiny model is ``name`` (``"tiny"``,
    ``"tiny-sd3"``, ``"tiny-flux"``, ``"tiny-wan"``, ``"tiny-qwen-image"``, ``"tiny-sana"``,
    ``"tiny-videocrafter2"``), or of the family named ``family``, built offline; ``video``: the
    family's text-to-video parts where it has both (SD's tiny UNet3D); ``settings``: its options by
    name (:func:`options_of`)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    found = TINY_MODELS[name] if family is None else named_family(family)
    options = options_of(found, repr(name), **settings)
    return adjusted(found, found.tiny(seed, pipeline_class=found.pipeline_for(video), options=options), options)


def prompt_encoder(components: Components) -> PromptEncoder | None:
    """A caching prompt encoder for ``components`` (None for an unconditional model)."""
    if components.text_encoder is None:
        return None
    return PromptEncoder(functools.partial(family_of(components).encode, components))
