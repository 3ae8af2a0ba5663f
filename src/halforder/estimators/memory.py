"""Activation memory, measured deterministically: the bytes autograd saves for backward.

Every tensor that autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``.
:class:`SavedTensorMeter` counts each saved storage once while anything holds it and
reports the peak of their bytes. Unlike an allocator's peak it does not depend on
fragmentation, caching or other work on the device, so it is the same on a CPU and a GPU.
Tensors saved inside ``torch.utils.checkpoint`` regions are held by torch's own hooks and
recomputed one region at a time in backward; they are not seen here.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch


class SavedTensorMeter:
    """Peak bytes of the storages autograd keeps for backward, the storages of ``exclude``
    (the model's weights) left out. A context manager; ``peak`` and ``live`` in bytes.

        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = f(x); loss.backward()
        meter.peak
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor):
        holder = _Holder(t)
        if t.layout != torch.strided:
            return holder
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return holder
        if key not in self._refs:
            self._bytes[key], self._refs[key] = storage.nbytes(), 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._bytes.pop(key)
            del self._refs[key]

    def reset_peak(self) -> None:
        """Start a new peak from what is held now."""
        self.peak = self.live

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor):
        self.t = t


def _unpack(holder: _Holder) -> torch.Tensor:
    return holder.t
