"""Data-parallel gradient reduction over Horovod, overlapped with backward.

:class:`GradientSync` groups the parameters into buckets of a few MB, in
reverse order of registration (roughly the order in which backward
produces their gradients).  Each parameter's ``.grad`` *is* a view into
its bucket's flat buffer (as ``DistributedDataParallel`` does with
``gradient_as_bucket_view=True``): autograd accumulates every micro-batch
straight into the bucket, and :meth:`GradientSync.zero_grad` zeroes the
buckets instead of dropping the gradients.  A hook on every parameter
fires as soon as that parameter's gradient is fully accumulated during
``backward()``; on the last micro-batch of an optimizer step, when every
gradient of a bucket is ready, an asynchronous Horovod allreduce starts
on the bucket, in place.  Late layers' buckets therefore travel while
autograd still computes early ones, each bucket costs Horovod one
negotiation instead of one per tensor, and no byte is copied on the way.
On the earlier micro-batches no communication happens at all.

The default reduction is a ``Sum``: the engine folds the 1/dp of the
average into the loss it back-propagates (:attr:`GradientSync.loss_factor`),
which saves a scaling pass over every gradient.  ``op="adasum"`` uses
Horovod's Adasum instead, on gradients that are not pre-scaled.

Transport.  Buckets in host memory (float32 or float64) are summed by MPI
directly, ``Allreduce(IN_PLACE)`` on a duplicate of the group's
communicator, run by one communication thread in the order the buckets
become ready (:class:`_InPlaceMpiReducer`).  Horovod would move the same
bytes with the same MPI call, but each bucket first waits for its
background thread's next cycle and a negotiation round; on CPU that cost
alone made the sync 1.7-2.2x a raw MPI allreduce of the same bytes
(docs/benchmarks.md).  Buckets in GPU memory, and Adasum, go through
Horovod (NCCL, its Adasum); ``HVDLLM_DP_TRANSPORT=horovod`` forces
Horovod for every bucket.
"""
from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from ..common import watchdog
from ..common.comm import Group
from ..common.compression import REDUCE_OPS
from ..common.watchdog import wait_horovod

DEFAULT_BUCKET_BYTES = 4 * 2**20
TRANSPORT_ENV = "HVDLLM_DP_TRANSPORT"
TRANSPORTS = ("auto", "horovod")
_MPI_DTYPES = (torch.float32, torch.float64)


def dp_transport() -> str:
    """``$HVDLLM_DP_TRANSPORT``: "auto" (MPI for host buckets, the default) or "horovod"."""
    value = os.environ.get(TRANSPORT_ENV, "auto").strip().lower() or "auto"
    if value not in TRANSPORTS:
        raise ValueError(f"{TRANSPORT_ENV}={value!r} is not one of {', '.join(TRANSPORTS)}")
    return value


class _Pending:
    """One bucket's allreduce on the communication thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class _InPlaceMpiReducer:
    """Sums flat host buffers over a communicator, one at a time, on its own thread.

    The communicator is a duplicate of the group's, so these collectives
    never interleave with others the main thread runs on the group.  Every
    rank submits the same buckets in the same order (bucket readiness
    follows the model's structure, identical on every rank); MPI matches
    them in that order.
    """

    def __init__(self, comm: Any):
        self.comm = comm.Dup()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hvdllm-dp-allreduce",
                                        daemon=True)
        self._thread.start()

    def submit(self, flat: torch.Tensor) -> _Pending:
        pending = _Pending()
        self._queue.put((flat, pending))
        return pending

    def _run(self) -> None:
        from mpi4py import MPI

        while True:
            item = self._queue.get()
            if item is None:
                return
            flat, pending = item
            try:
                self.comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
            except BaseException as exc:  # handed to the waiting main thread
                pending.error = exc
            pending.done.set()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self.comm.Free()


class _Bucket:
    """Parameters whose gradients travel together in one flat buffer."""

    def __init__(self, index: int, params: list[tuple[str, torch.nn.Parameter]]):
        self.index = index
        self.params = params
        self.ready = 0
        self.handle: list[Any] | None = None
        numel = sum(p.numel() for _, p in params)
        self.flat = torch.zeros(numel, dtype=params[0][1].dtype)
        self.views = []
        offset = 0
        for _, p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class GradientSync:
    """Reduce gradients of ``named_parameters`` across ``group``, overlapped with backward.

    With a group of more than one rank, every parameter's ``.grad`` becomes
    a view into a bucket buffer at construction (any gradient it held is
    kept) and must stay one: clear gradients with :meth:`zero_grad`, never
    ``set_to_none``.

    Args:
        named_parameters: (name, parameter) pairs, identical on every rank.
        group: the data-parallel group; its ``comm`` (MPI transport) or
            ``process_set`` (Horovod) is used.
        hvd: the ``horovod.torch`` module.
        bucket_bytes: target size of one allreduce.
        op: "average" (Horovod ``Sum`` of gradients whose loss was
            multiplied by :attr:`loss_factor` = 1/dp) or "adasum".
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 group: Group, hvd: Any, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 op: str = "average"):
        if op not in REDUCE_OPS:
            raise ValueError(f"reduce op must be one of {', '.join(REDUCE_OPS)}, got {op!r}")
        self.group = group
        self.hvd = hvd
        self.op = op
        self.params = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._enabled = False
        self._hooks = []
        self._mpi: _InPlaceMpiReducer | None = None
        if group.size > 1:
            self._hvd_op = hvd.Adasum if op == "adasum" else hvd.Sum
            self._build_buckets(bucket_bytes)
            if (op == "average" and dp_transport() == "auto"
                    and getattr(group, "comm", None) is not None
                    and all(b.flat.device.type == "cpu" and b.flat.dtype in _MPI_DTYPES
                            for b in self.buckets)):
                self._mpi = _InPlaceMpiReducer(group.comm)
            with torch.no_grad():
                for bucket in self.buckets:
                    for (_, p), view in zip(bucket.params, bucket.views):
                        if p.grad is not None:
                            view.copy_(p.grad)
                        p.grad = view
            for _, p in self.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def loss_factor(self) -> float:
        """What the back-propagated loss is multiplied by: 1/dp for "average", else 1."""
        return 1.0 / self.group.size if self.group.size > 1 and self.op == "average" else 1.0

    def zero_grad(self) -> None:
        """Zero every gradient in place (the gradients stay views into the buckets)."""
        if not self.buckets:
            for _, p in self.params:
                p.grad = None
            return
        with torch.no_grad():
            for bucket in self.buckets:
                self._check_views(bucket)
                bucket.flat.zero_()

    @staticmethod
    def _check_views(bucket: _Bucket) -> None:
        for (name, p), view in zip(bucket.params, bucket.views):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                raise RuntimeError(
                    f"the gradient of {name} is no longer a view into its data-parallel bucket "
                    f"(was it set to None or replaced?); clear gradients with "
                    f"GradientSync.zero_grad()")

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
        self._check_views(bucket)
        if self.op == "adasum":
            # Adasum's projections are per parameter (layer-wise), so each
            # gradient goes as its own tensor; Horovod fuses them and keeps
            # their boundaries.
            bucket.handle = [self.hvd.allreduce_async_(
                view, op=self._hvd_op, name=f"dp.grad.{name}",
                process_set=self.group.process_set)
                for (name, _), view in zip(bucket.params, bucket.views)]
        elif self._mpi is not None:
            bucket.handle = [self._mpi.submit(bucket.flat)]
        else:
            bucket.handle = [self.hvd.allreduce_async_(
                bucket.flat, op=self._hvd_op, name=f"dp.grad.bucket{bucket.index}",
                process_set=self.group.process_set)]

    @property
    def transport(self) -> str:
        """"mpi" (in-place MPI on a communication thread), "horovod", or "none" (dp = 1)."""
        if not self.buckets:
            return "none"
        return "mpi" if self._mpi is not None else "horovod"

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
        parameters) are reduced here; their zeroed views stand in.
        """
        for bucket in self.buckets:
            if bucket.handle is None:
                self._start(bucket)
        wd = watchdog.current()
        group = self.group
        with torch.no_grad():
            for bucket in self.buckets:
                nbytes = bucket.flat.numel() * bucket.flat.element_size()
                for handle in bucket.handle:
                    if isinstance(handle, _Pending):
                        with wd.waiting(f"dp gradient allreduce (bucket {bucket.index}, in "
                                        f"place, MPI)", group.kind, group.ranks, nbytes=nbytes):
                            handle.done.wait()
                        if handle.error is not None:
                            bucket.handle, bucket.ready = None, 0
                            raise handle.error
                    else:
                        wait_horovod(self.hvd, handle,
                                     f"dp gradient allreduce (bucket {bucket.index})", group,
                                     nbytes)
                bucket.handle, bucket.ready = None, 0

    def remove(self) -> None:
        """Detach the hooks and stop the communication thread (call on every rank)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._mpi is not None:
            self._mpi.close()
            self._mpi = None


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
