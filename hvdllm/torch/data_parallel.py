"""Data-parallel gradient averaging over Horovod, overlapped with backward.

:class:`GradientSync` registers a hook on every parameter that fires as soon
as that parameter's gradient is fully accumulated during ``backward()``.
On the last micro-batch of an optimizer step the hook starts an
asynchronous Horovod allreduce (average over the DP process set) of that
gradient, so communication of late layers runs while autograd is still
computing early ones.  Horovod's tensor fusion batches the small tensors.
On the earlier micro-batches no communication happens at all.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from ..common.comm import Group


class GradientSync:
    """Average gradients of ``named_parameters`` across ``group`` with Horovod.

    Args:
        named_parameters: (name, parameter) pairs, identical on every rank.
        group: the data-parallel group; its ``process_set`` is used.
        hvd: the ``horovod.torch`` module.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 group: Group, hvd: Any):
        self.group = group
        self.hvd = hvd
        self.params = [(n, p) for n, p in named_parameters if p.requires_grad]
        self._enabled = False
        self._handles: dict[str, Any] = {}
        self._hooks = []
        if group.size > 1:
            for name, p in self.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self._enabled:
                self._start(name, p)
        return hook

    def _start(self, name: str, p: torch.Tensor) -> None:
        if name in self._handles:
            raise RuntimeError(f"gradient of {name} reduced twice in one step")
        self._handles[name] = self.hvd.allreduce_async_(
            p.grad, op=self.hvd.Average, name=f"dp.grad.{name}",
            process_set=self.group.process_set)

    @contextmanager
    def sync(self) -> Iterator[None]:
        """Within this block, ``backward()`` starts gradient allreduces."""
        self._enabled = True
        try:
            yield
        finally:
            self._enabled = False

    def wait(self) -> None:
        """Finish every allreduce of this step; call before ``optimizer.step()``."""
        if self.group.size == 1:
            return
        for name, p in self.params:
            if name not in self._handles:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._start(name, p)
        for handle in self._handles.values():
            self.hvd.synchronize(handle)
        self._handles.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def broadcast_module(module: torch.nn.Module, group: Group, hvd: Any, root: int = 0) -> None:
    """Copy parameters and buffers from ``group`` rank ``root`` to every rank of the group.

    Horovod takes ``root_rank`` as a global rank and maps it into the
    process set itself, so the group rank is translated here.
    """
    if group.size == 1:
        return
    root_global = group.ranks[root]
    handles = []
    for name, tensor in module.state_dict().items():
        handles.append(hvd.broadcast_async_(tensor, root_rank=root_global,
                                            name=f"bcast.{name}", process_set=group.process_set))
    for handle in handles:
        hvd.synchronize(handle)
