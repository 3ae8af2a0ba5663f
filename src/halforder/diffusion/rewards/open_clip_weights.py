"""An open_clip checkpoint of OpenAI's CLIP architecture, loaded into transformers' ``CLIPModel``
(no open_clip, hence no torchvision).

open_clip names the weights of its ``CLIP`` class (the layout of OpenAI's CLIP) as follows, and
:func:`open_clip_to_transformers` renames them for ``CLIPModel``:

====================================================  ==============================================================
open_clip                                             transformers
====================================================  ==============================================================
``visual.conv1.weight``                               ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                            ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                       ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``                ``vision_model.pre_layrnorm`` / ``vision_model.post_layernorm``
``visual.transformer.resblocks.N``                    ``vision_model.encoder.layers.N``
``visual.proj`` ([width, dim])                        ``visual_projection.weight`` (transposed)
``token_embedding.weight``                            ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                              ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.N``                           ``text_model.encoder.layers.N``
``ln_final``                                          ``text_model.final_layer_norm``
``text_projection`` ([width, dim])                    ``text_projection.weight`` (transposed)
``logit_scale``                                       ``logit_scale``
====================================================  ==============================================================

and in each residual block ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``attn.out_proj``
become ``layer_norm1``, ``layer_norm2``, ``mlp.fc1``, ``mlp.fc2``, ``self_attn.out_proj``, while
the packed ``attn.in_proj_weight`` / ``attn.in_proj_bias`` (rows q, k, v) are split into
``self_attn.{q,k,v}_proj``. The causal mask buffer ``attn_mask`` is dropped.

The architecture's sizes that the weights do not fix (the heads, the activation: GELU for
open_clip's ViT-H/14, QuickGELU for OpenAI's) come from a ``CLIPConfig``, e.g. that of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; :func:`clip_from_open_clip` checks every weight's
shape against it. Text features match open_clip's where the end-of-text token has the largest
id (CLIP's BPE: 49407) and the config's ``eos_token_id`` names it: open_clip pools the text at
the argmax of the token ids, transformers at the first ``eos_token_id``.
"""
from __future__ import annotations

from typing import Mapping

import torch

_EXACT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_PREFIXES = {
    "visual.ln_pre.": "vision_model.pre_layrnorm.",
    "visual.ln_post.": "vision_model.post_layernorm.",
    "ln_final.": "text_model.final_layer_norm.",
}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
           "transformer.resblocks.": "text_model.encoder.layers."}
_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
          "attn.out_proj.": "self_attn.out_proj."}
_PACKED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_DROPPED = ("attn_mask",)


def open_clip_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``, an open_clip ``CLIP`` state dict (optionally with a ``module.`` prefix), with
    the names and shapes of transformers' ``CLIPModel`` (module docstring). ``ValueError``
    naming the weights that have no counterpart."""
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _DROPPED:
            continue
        if key in _EXACT:
            out[_EXACT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (prefix := next((p for p in _PREFIXES if key.startswith(p)), None)) is not None:
            out[_PREFIXES[prefix] + key[len(prefix):]] = value
        elif (tower := next((p for p in _TOWERS if key.startswith(p)), None)) is not None:
            index, _, rest = key[len(tower):].partition(".")
            layer = f"{_TOWERS[tower]}{index}."
            if rest in _PACKED:
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}_proj.{_PACKED[rest]}"] = part.contiguous()
            elif (block := next((p for p in _BLOCK if rest.startswith(p)), None)) is not None:
                out[layer + _BLOCK[block] + rest[len(block):]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip CLIP checkpoint of OpenAI's layout: no counterpart for "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return out


def clip_from_open_clip(state: Mapping[str, torch.Tensor], config, dtype: torch.dtype = torch.float32):
    """A frozen ``CLIPModel`` of ``config`` (a ``CLIPConfig``) holding the open_clip weights
    ``state``, in ``dtype``. ``ValueError`` if a weight is missing, left over or of another
    shape than ``config`` gives it."""
    from transformers import CLIPModel

    mapped = {k: v.to(dtype) for k, v in open_clip_to_transformers(state).items()}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    wrong = [f"{k} {tuple(mapped[k].shape)} (the config: {expected[k]})" for k in sorted(set(mapped) & set(expected))
             if tuple(mapped[k].shape) != expected[k]]
    for what, names in (("lacks", missing), ("has weights the config has not", extra), ("has shapes", wrong)):
        if names:
            raise ValueError(f"the open_clip checkpoint does not fit the CLIP config: it {what}: "
                             f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    model = CLIPModel.from_pretrained(None, config=config, state_dict=mapped, dtype=dtype)
    return model.eval().requires_grad_(False)
