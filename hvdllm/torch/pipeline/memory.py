"""Measure the activation memory autograd keeps for backward.

:class:`SavedTensorMeter` watches every tensor that autograd saves for
backward while it is active (``torch.autograd.graph.saved_tensors_hooks``)
and reports how many bytes of them are alive, now and at the peak.
Parameters are left out (a linear layer saves its weight, which is not
activation memory), and tensors sharing one storage count once.  It is how
the pipeline tests check that a stage frees its activations and how the
pipeline benchmark compares the schedules' memory.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator

import torch


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward.

    Args:
        parameters: parameters whose storage is not counted.
    """

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._skip = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.peak_bytes = 0

    def live_bytes(self) -> int:
        """Bytes of distinct storages of saved tensors that are still alive."""
        storages = {}
        for t in list(self._live.values()):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self._skip:
            self._live[id(t)] = t
            self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return t

    @contextlib.contextmanager
    def watch(self) -> Iterator["SavedTensorMeter"]:
        """Within this block, saved tensors are counted."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
