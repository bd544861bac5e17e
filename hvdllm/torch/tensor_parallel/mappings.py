"""Tensor-parallel communication: a group handle and mirror-pair autograd functions.

:class:`TensorParallelGroup` runs the collectives TP needs on torch tensors
over the TP group of the topology.  CPU tensors go straight through the
group's mpi4py communicator (in place where possible, no Horovod
negotiation, which matters for the many small latency-bound calls of TP);
any call can instead go through the group's Horovod process set
(``backend="horovod"``), which is also what device tensors use.  Every
blocking wait has the group's deadline, so a missing peer becomes an error
naming it rather than a hang.

The autograd functions come in mirror pairs (forward of one is the backward
of the other), each its own :class:`torch.autograd.Function` with the group
passed explicitly.  ``hvd.allreduce`` is never differentiated through: its
own gradient is another allreduce, which would multiply gradients by tp.

=========================  ======================  =========================
function                   forward                 backward
=========================  ======================  =========================
copy_to_region             identity                allreduce
reduce_from_region         allreduce               identity
scatter_to_region          keep own last-dim part  allgather last dim
gather_from_region         allgather last dim      keep own last-dim part
scatter_to_sequence        keep own sequence part  allgather sequence
gather_from_sequence       allgather sequence      reduce-scatter sequence
reduce_scatter_to_sequence reduce-scatter seq.     allgather sequence
=========================  ======================  =========================

The sequence dimension is dim 1 of (batch, seq, features) activations.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

from ...common import watchdog
from ...common.comm import Group
from ...common.errors import CommError

SEQ_DIM = 1
_MPI_DTYPES = (torch.float32, torch.float64)


class TensorParallelGroup:
    """Collectives on tensors over one TP group, plus the sequence-parallel switch.

    Args:
        group: the TP :class:`~hvdllm.common.comm.Group` of this rank.
        sequence_parallel: split norm/dropout regions along the sequence.
        backend: "mpi" (CPU tensors through mpi4py; others through Horovod)
            or "horovod" (always through the group's Horovod process set).
        hvd: the ``horovod.torch`` module, needed by the Horovod path.
    """

    def __init__(self, group: Group, sequence_parallel: bool = False, backend: str = "mpi",
                 hvd: Any = None):
        if backend not in ("mpi", "horovod"):
            raise ValueError(f"unknown tensor-parallel backend {backend!r}; use 'mpi' or 'horovod'")
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.backend = backend
        self.hvd = hvd
        self._calls = 0
        self._entered: tuple | None = None

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.group.rank

    @contextlib.contextmanager
    def sequence_parallel_off(self) -> Iterator[None]:
        """Run with full sequences on every rank (generation, whose length varies)."""
        saved, self.sequence_parallel = self.sequence_parallel, False
        try:
            yield
        finally:
            self.sequence_parallel = saved

    def enter_column_region(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """``x`` made ready for a column-parallel matmul.

        The whole sequence (allgather) under sequence parallelism, else an
        identity whose backward allreduces.  ``shared=True`` reuses the result
        for consecutive layers fed the very same tensor (LLaMA's q, k, v and
        gate, up), so they cost one collective each way instead of one per
        layer: their input gradients add up before the single reduction.
        """
        if shared and self._entered is not None:
            ref, version, sp, grad_mode, entered = self._entered
            if (ref() is x and version == x._version and sp == self.sequence_parallel
                    and grad_mode == torch.is_grad_enabled()):
                return entered
        if self.sequence_parallel:
            entered = gather_from_sequence(x, self)
        else:
            entered = copy_to_region(x, self)
        self._entered = ((weakref.ref(x), x._version, self.sequence_parallel,
                          torch.is_grad_enabled(), entered) if shared else None)
        return entered

    # -- transport ---------------------------------------------------------
    def _use_mpi(self, t: torch.Tensor) -> bool:
        return self.backend == "mpi" and t.device.type == "cpu"

    def _horovod(self) -> Any:
        if self.hvd is None:
            raise CommError("tensor-parallel group has no Horovod module for its Horovod path")
        return self.hvd

    def _wait(self, request: Any, op: str, t: torch.Tensor) -> None:
        self.group.pending([request], f"tensor-parallel {op} of {t.dtype}{list(t.shape)}",
                           nbytes=t.numel() * t.element_size()).wait()

    def _horovod_wait(self, op: str, t: torch.Tensor) -> Any:
        """A blocking Horovod call on the TP group, as a watchdog-bounded wait."""
        return watchdog.current().waiting(
            f"tensor-parallel {op} of {t.dtype}{list(t.shape)} (Horovod)", self.group.kind,
            self.group.ranks, nbytes=t.numel() * t.element_size())

    @staticmethod
    def _wire(t: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor that MPI can read (half types travel as fp32)."""
        if t.dtype not in _MPI_DTYPES:
            t = t.float()
        return t.contiguous()

    def _name(self, op: str) -> str:
        self._calls += 1
        return f"tp.{op}.{self._calls}"

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise sum (or "max") over the group; returns a new tensor."""
        if self.size == 1:
            return t.clone()
        if self._use_mpi(t):
            from mpi4py import MPI

            buf = self._wire(t).clone()
            mpi_op = MPI.SUM if op == "sum" else MPI.MAX
            self._wait(self.group.comm.Iallreduce(MPI.IN_PLACE, buf.numpy(), op=mpi_op),
                       f"allreduce({op})", t)
            return buf.to(t.dtype)
        hvd = self._horovod()
        hvd_op = hvd.Sum if op == "sum" else hvd.Max
        with self._horovod_wait(f"allreduce({op})", t):
            return hvd.allreduce(t.contiguous(), op=hvd_op, name=self._name("allreduce"),
                                 process_set=self.group.process_set)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim`` (equal shapes)."""
        if self.size == 1:
            return t
        front = t.movedim(dim, 0)
        if self._use_mpi(t):
            send = self._wire(front)
            recv = torch.empty((self.size,) + tuple(send.shape), dtype=send.dtype)
            self._wait(self.group.comm.Iallgather(send.numpy(), recv.numpy()), "allgather", t)
            gathered = recv.reshape((-1,) + tuple(send.shape[1:])).to(t.dtype)
        else:
            hvd = self._horovod()
            with self._horovod_wait("allgather", t):
                gathered = hvd.allgather(front.contiguous(), name=self._name("allgather"),
                                         process_set=self.group.process_set)
        return gathered.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over the group, keeping this rank's equal part of ``dim``."""
        if self.size == 1:
            return t
        if t.size(dim) % self.size:
            raise CommError(
                f"tensor-parallel reduce-scatter: dimension {dim} of shape {list(t.shape)} is "
                f"not divisible by the tp group size {self.size}")
        front = t.movedim(dim, 0)
        if self._use_mpi(t):
            send = self._wire(front)
            recv = torch.empty((send.shape[0] // self.size,) + tuple(send.shape[1:]),
                               dtype=send.dtype)
            self._wait(self.group.comm.Ireduce_scatter_block(send.numpy(), recv.numpy()),
                       "reduce-scatter", t)
            part = recv.to(t.dtype)
        else:
            hvd = self._horovod()
            with self._horovod_wait("reduce-scatter", t):
                part = hvd.reducescatter(front.contiguous(), op=hvd.Sum,
                                         name=self._name("reducescatter"),
                                         process_set=self.group.process_set)
        return part.movedim(0, dim)

    def local_part(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's equal part of ``dim`` (no communication)."""
        if self.size == 1:
            return t
        if t.size(dim) % self.size:
            raise CommError(
                f"tensor-parallel split: dimension {dim} of shape {list(t.shape)} is not "
                f"divisible by the tp group size {self.size}")
        return t.chunk(self.size, dim=dim)[self.rank].contiguous()

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the group, in one flat message."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        total = self.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(total[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# -- mirror pairs ------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_reduce(grad), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return tp.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return tp.local_part(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_gather(grad.contiguous(), -1), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return tp.all_gather(x.contiguous(), -1)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.local_part(grad, -1), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return tp.local_part(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_gather(grad.contiguous(), SEQ_DIM), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return tp.all_gather(x.contiguous(), SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        # The consumer is a column-parallel layer whose input gradient is a
        # partial sum on each rank: reduce, and keep this rank's part.
        return ctx.tp.reduce_scatter(grad.contiguous(), SEQ_DIM), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return tp.reduce_scatter(x.contiguous(), SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_gather(grad.contiguous(), SEQ_DIM), None


def copy_to_region(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Identity forward, allreduce backward (enter a column-parallel region)."""
    return _CopyToRegion.apply(x, tp) if tp.size > 1 else x


def reduce_from_region(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Allreduce forward, identity backward (leave a row-parallel region)."""
    return _ReduceFromRegion.apply(x, tp) if tp.size > 1 else x


def scatter_to_region(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Keep this rank's slice of the last dim; allgather its gradient."""
    return _ScatterToRegion.apply(x, tp) if tp.size > 1 else x


def gather_from_region(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Allgather along the last dim; keep this rank's slice of the gradient."""
    return _GatherFromRegion.apply(x, tp) if tp.size > 1 else x


def scatter_to_sequence(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Keep this rank's part of the sequence; allgather the gradient."""
    return _ScatterToSequence.apply(x, tp) if tp.size > 1 else x


def gather_from_sequence(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Allgather the sequence; reduce-scatter the gradient."""
    return _GatherFromSequence.apply(x, tp) if tp.size > 1 else x


def reduce_scatter_to_sequence(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Sum over the group keeping this rank's part of the sequence; allgather the gradient."""
    return _ReduceScatterToSequence.apply(x, tp) if tp.size > 1 else x

