"""Weights cached on disk, keyed by a hash of the configuration that produced them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

import torch

from halforder.training.files import atomic_file


def config_key(config) -> str:
    """A short hash of a config dataclass (the cache key)."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:12]


def cached_module(prefix: str, config, cache_dir: str | os.PathLike, build: Callable[[], torch.nn.Module],
                  train: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The module for ``config``: ``build()`` loaded from ``cache_dir/<prefix>-<key>.safetensors``
    if present, otherwise ``train()``, stored there atomically. Returned frozen, in eval mode."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(os.fspath(cache_dir), f"{prefix}-{config_key(config)}.safetensors")
    if os.path.exists(path):
        module = build()
        module.load_state_dict(load_file(path))
    else:
        module = train()
        with atomic_file(path, ".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp,
                      metadata={"config": json.dumps(dataclasses.asdict(config), sort_keys=True)})
    return module.eval().requires_grad_(False)
