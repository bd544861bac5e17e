"""Data-parallel gradient averaging over Horovod, overlapped with backward.

:class:`GradientSync` groups the parameters into buckets of a few MB, in
reverse order of registration (roughly the order in which backward
produces their gradients).  A hook on every parameter fires as soon as that
parameter's gradient is fully accumulated during ``backward()``; on the
last micro-batch of an optimizer step, when every gradient of a bucket is
ready, the bucket is copied into one flat buffer and an asynchronous
Horovod allreduce (average over the DP process set) starts on it.  Late
layers' buckets therefore travel while autograd still computes early ones,
and each bucket costs Horovod one negotiation instead of one per tensor.
On the earlier micro-batches no communication happens at all.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from ..common import watchdog
from ..common.comm import Group
from ..common.watchdog import wait_horovod

DEFAULT_BUCKET_BYTES = 4 * 2**20


class _Bucket:
    """Parameters whose gradients travel together in one flat buffer."""

    def __init__(self, index: int, params: list[tuple[str, torch.nn.Parameter]]):
        self.index = index
        self.params = params
        self.ready = 0
        self.handle: Any = None
        numel = sum(p.numel() for _, p in params)
        self.flat = torch.empty(numel, dtype=params[0][1].dtype)
        self.views = []
        offset = 0
        for _, p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class GradientSync:
    """Average gradients of ``named_parameters`` across ``group`` with Horovod.

    Args:
        named_parameters: (name, parameter) pairs, identical on every rank.
        group: the data-parallel group; its ``process_set`` is used.
        hvd: the ``horovod.torch`` module.
        bucket_bytes: target size of one allreduce.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 group: Group, hvd: Any, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.hvd = hvd
        self.params = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._enabled = False
        self._hooks = []
        if group.size > 1:
            self._build_buckets(bucket_bytes)
            for _, p in self.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    def _build_buckets(self, bucket_bytes: int) -> None:
        current: list[tuple[str, torch.nn.Parameter]] = []
        size = 0
        for name, p in reversed(self.params):
            if current and (size >= bucket_bytes or p.dtype != current[0][1].dtype):
                self.buckets.append(_Bucket(len(self.buckets), current))
                current, size = [], 0
            current.append((name, p))
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(len(self.buckets), current))
        for bucket in self.buckets:
            for _, p in bucket.params:
                self._bucket_of[id(p)] = bucket

    def _hook(self, p: torch.Tensor) -> None:
        if not self._enabled:
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        if bucket.handle is not None:
            raise RuntimeError(f"gradient bucket {bucket.index} reduced twice in one step")
        with torch.no_grad():
            for (_, p), view in zip(bucket.params, bucket.views):
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
        bucket.handle = self.hvd.allreduce_async_(
            bucket.flat, op=self.hvd.Average, name=f"dp.grad.bucket{bucket.index}",
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
        """Finish every allreduce of this step; call before ``optimizer.step()``.

        Buckets whose parameters got no gradient in backward (unused
        parameters) are reduced here, with zeros standing in.
        """
        for bucket in self.buckets:
            if bucket.handle is None:
                self._start(bucket)
        with torch.no_grad():
            for bucket in self.buckets:
                wait_horovod(self.hvd, bucket.handle,
                             f"dp gradient allreduce (bucket {bucket.index})", self.group,
                             bucket.flat.numel() * bucket.flat.element_size())
                bucket.handle, bucket.ready = None, 0
                for (_, p), view in zip(bucket.params, bucket.views):
                    if p.grad is None:
                        p.grad = view.clone()
                    else:
                        p.grad.copy_(view)

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
    with watchdog.current().waiting("broadcast of the initial weights", group.kind, group.ranks):
        for handle in handles:
            hvd.synchronize(handle)
