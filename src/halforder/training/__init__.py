"""A model-agnostic training loop over any chain and plan sampler (:mod:`.loop`), its
settings (:mod:`.config`), training checkpoints (:mod:`.checkpoints`), resuming
(:mod:`.resume`) and atomic file writes (:mod:`.files`). Needs ``accelerate`` and ``safetensors`` (the ``diffusion`` extra)."""
from .checkpoints import Checkpoint, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, LoopConfig, knob
from .loop import Hooks, Task, TrainResult, TrainRNG, make_accelerator, train

__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "Hooks", "LoopConfig", "Task", "TrainRNG", "TrainResult",
           "knob", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "make_accelerator", "save_checkpoint",
           "train"]
