"""The ``horovod.torch`` API, with hvdllm's defaults and gradient compressions.

Reached through ``import hvdllm.torch as hvd``: a script written for
``horovod.torch`` runs unchanged with only that import swapped.

* ``init(comm=None, process_sets=None, timeout=None, watchdog=True)``
  applies hvdllm's Horovod settings (cycle time, stall deadline; values the
  user exported win), starts hvdllm's hang watchdog
  (:mod:`hvdllm.common.watchdog`) and then calls Horovod's ``init``.
  ``timeout`` (seconds; else ``$HVDLLM_TIMEOUT_SEC``, else
  :data:`DEFAULT_TIMEOUT_SEC`) bounds every wait on other ranks: Horovod's
  start-up, the blocking collectives served here (``allreduce``,
  ``broadcast_parameters``, ``synchronize``, ``barrier``, ...) and the
  gradient averaging of ``DistributedOptimizer``.  A wait longer than that
  prints a report naming the likeliest culprit rank, writes
  ``hang-rank-K.json`` (into ``$HVDLLM_HANG_DIR``, else the working
  directory) and ends the job.  Its step is the count of optimizer steps.
* ``DistributedOptimizer`` with ``Compression.none`` or ``Compression.fp16``
  is Horovod's own (allreduce per gradient, overlapped with backward).  With
  ``Compression.bf16``, ``Compression.topk(ratio)`` or
  ``Compression.powersgd(rank)`` it averages the gradients with an hvdllm
  compressor (:mod:`hvdllm.torch.compression`) when ``step()`` (or
  ``synchronize()``) runs, after all backward passes, so gradient
  accumulation over ``backward_passes_per_step`` passes needs no extra care.
  Those compressions support ``op=Average`` over the global process set.
* Every other name is Horovod's.

This module imports Horovod when it is imported; :mod:`hvdllm.torch`
imports it only on first use of a Horovod name.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from ..common import watchdog as _watchdog
from ..common.comm import Group
from ..common.compression import DEFAULT_POWERSGD_RANK, DEFAULT_TOPK_RATIO, check_compression
from ..common.launch import start_horovod
from .compression import GradientCompressor, make_compressor, require_horovod_support
from .distributed import import_horovod

_hvd = import_horovod()
DEFAULT_TIMEOUT_SEC = 300.0


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)
    return getattr(_hvd, name)


_timeout_sec = DEFAULT_TIMEOUT_SEC
# Blocking Horovod calls served as watchdog-bounded waits.
_BLOCKING = ("allreduce", "allreduce_", "grouped_allreduce", "grouped_allreduce_", "allgather",
             "grouped_allgather", "broadcast", "broadcast_", "alltoall", "reducescatter",
             "grouped_reducescatter", "synchronize", "join", "barrier", "broadcast_parameters",
             "broadcast_optimizer_state", "broadcast_object", "allgather_object")


def init(comm: Any = None, process_sets: Any = None, timeout: float | None = None,
         watchdog: bool = True) -> None:
    """Horovod's ``init(comm, process_sets)`` with hvdllm's deadline and hang watchdog.

    Args:
        comm, process_sets: Horovod's.
        timeout: seconds any wait on other ranks may last; default
            ``$HVDLLM_TIMEOUT_SEC``, else :data:`DEFAULT_TIMEOUT_SEC`.
        watchdog: False skips the watchdog (Horovod's stall shutdown, at
            twice the deadline, is then the only bound, and it needs every
            rank's Horovod thread alive).
    """
    global _timeout_sec
    _timeout_sec = start_horovod(_hvd, comm, process_sets, timeout, watchdog,
                                 DEFAULT_TIMEOUT_SEC)


def _world_ranks() -> tuple[int, ...]:
    return tuple(range(_hvd.size()))


def _bounded(name: str) -> Callable[..., Any]:
    """Horovod's blocking ``name`` as a watchdog-bounded wait."""
    fn = getattr(_hvd, name)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _watchdog.current().waiting(f"horovod.torch.{name}", "world", _world_ranks()):
            return fn(*args, **kwargs)

    return call


for _name in _BLOCKING:
    globals()[_name] = _bounded(_name)


@dataclass(frozen=True)
class CompressionSpec:
    """An hvdllm gradient compression for :func:`DistributedOptimizer`.

    Args:
        mode: "bf16", "topk" or "powersgd".
        topk_ratio: fraction of entries top-k sends.
        powersgd_rank: PowerSGD approximation rank.
    """

    mode: str
    topk_ratio: float = DEFAULT_TOPK_RATIO
    powersgd_rank: int = DEFAULT_POWERSGD_RANK

    def __post_init__(self) -> None:
        check_compression(self.mode, self.topk_ratio, self.powersgd_rank)

    def compress(self, tensor: torch.Tensor) -> Any:
        raise TypeError(f"Compression.{self.mode} works with DistributedOptimizer only; a single "
                        f"allreduce takes Compression.none or Compression.fp16")

    decompress = compress


class Compression:
    """Gradient compressions: Horovod's ``none`` and ``fp16``, and hvdllm's others."""

    none = _hvd.Compression.none
    fp16 = _hvd.Compression.fp16
    bf16 = CompressionSpec("bf16")

    @staticmethod
    def topk(ratio: float = DEFAULT_TOPK_RATIO) -> CompressionSpec:
        """Send the ``ratio`` fraction of largest-magnitude entries, with error feedback."""
        return CompressionSpec("topk", topk_ratio=ratio)

    @staticmethod
    def powersgd(rank: int = DEFAULT_POWERSGD_RANK) -> CompressionSpec:
        """Rank-``rank`` PowerSGD with error feedback and warm start."""
        return CompressionSpec("powersgd", powersgd_rank=rank)


class _CompressedSync:
    """Mixed into the wrapped optimizer's class: average gradients before ``step()``."""

    def _hvdllm_setup(self, named_parameters: list[tuple[str, torch.Tensor]],
                      compressor: GradientCompressor, backward_passes_per_step: int) -> None:
        self._hvdllm_named = named_parameters
        self.compressor = compressor
        self.backward_passes_per_step = backward_passes_per_step
        self._hvdllm_synchronized = False
        self._hvdllm_should_sync = True

    def synchronize(self) -> None:
        """Average the gradients over the process set now (collective)."""
        self.compressor.reduce_grads_(self._hvdllm_named)
        self._hvdllm_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Within this block ``step()`` does not average (call ``synchronize()`` before)."""
        self._hvdllm_should_sync = False
        try:
            yield
        finally:
            self._hvdllm_should_sync = True

    def step(self, closure: Any = None) -> Any:
        """Average the gradients (unless already done or skipped), then the optimizer's step."""
        _count_step(self)
        if self._hvdllm_should_sync and not self._hvdllm_synchronized:
            self.synchronize()
        self._hvdllm_synchronized = False
        return super().step(closure)


def _count_step(optimizer: Any) -> None:
    """Tell the watchdog that optimizer step n (1-based) begins."""
    optimizer._hvdllm_steps = getattr(optimizer, "_hvdllm_steps", 0) + 1
    _watchdog.current().set_step(optimizer._hvdllm_steps)


def _bounded_horovod_optimizer(optimizer: Any) -> Any:
    """Horovod's own DistributedOptimizer, its waits bounded and its steps counted."""
    sync, step = optimizer.synchronize, optimizer.step

    def synchronize() -> None:
        with _watchdog.current().waiting("DistributedOptimizer gradient allreduce", "world",
                                         _world_ranks()):
            sync()

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        _count_step(optimizer)
        return step(*args, **kwargs)

    # Instance attributes win over the class's methods, and Horovod's step()
    # calls self.synchronize(), so both paths go through the wrappers.
    optimizer.synchronize, optimizer.step = synchronize, counted_step
    return optimizer


def _world_group() -> Group:
    """An hvdllm group of every rank, over Horovod's global process set."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return Group("dp", world, range(world.Get_size()), timeout_sec=_timeout_sec,
                 process_set=_hvd.global_process_set)


def _named(optimizer: torch.optim.Optimizer,
           named_parameters: Iterable[tuple[str, torch.Tensor]] | None) -> list[tuple[str, Any]]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if named_parameters is None:
        return [(f"param.{i}", p) for i, p in enumerate(params)]
    named = list(named_parameters)
    if any(not isinstance(x, tuple) or len(x) != 2 for x in named):
        raise ValueError("named_parameters must be (name, parameter) pairs, e.g. "
                         "model.named_parameters()")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("parameter names in named_parameters must be unique")
    unnamed = {id(p) for p in params} - {id(p) for _, p in named}
    if unnamed:
        raise ValueError(f"{len(unnamed)} optimizer parameter(s) missing from named_parameters")
    wanted = {id(p) for p in params}
    return [(n, p) for n, p in named if id(p) in wanted]


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = None, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` uses gradients averaged over all ranks.

    The arguments are Horovod's, in Horovod's order.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        named_parameters: (name, parameter) pairs, e.g. ``model.named_parameters()``.
        compression: ``Compression.none``/``fp16`` (Horovod's path) or
            ``Compression.bf16``/``topk(ratio)``/``powersgd(rank)`` (hvdllm's).
        backward_passes_per_step: backward passes accumulated per ``step()``.
        op: reduction, ``Average`` by default (hvdllm compressions: Average only).
        gradient_predivide_factor, num_groups, groups, sparse_as_dense:
            Horovod's options, for Horovod's path only.
        process_set: Horovod process set; the global one by default (the
            only one hvdllm's compressions support).
    """
    op = _hvd.Average if op is None else op
    process_set = _hvd.global_process_set if process_set is None else process_set
    if compression in (Compression.topk, Compression.powersgd):
        compression = compression()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device.type if params else "cpu"
    if not isinstance(compression, CompressionSpec):
        if compression is Compression.fp16:
            require_horovod_support(_hvd, [("allreduce", torch.float16)], device,
                                    "Compression.fp16")
        return _bounded_horovod_optimizer(_hvd.DistributedOptimizer(
            optimizer, named_parameters=named_parameters, compression=compression,
            backward_passes_per_step=backward_passes_per_step, op=op,
            gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
            groups=groups, sparse_as_dense=sparse_as_dense, process_set=process_set))
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    unsupported = {"op": op != _hvd.Average,
                   "process_set": process_set is not _hvd.global_process_set,
                   "gradient_predivide_factor": gradient_predivide_factor != 1.0,
                   "num_groups": num_groups != 0, "groups": groups is not None,
                   "sparse_as_dense": bool(sparse_as_dense)}
    if any(unsupported.values()):
        names = ", ".join(k for k, bad in unsupported.items() if bad)
        raise ValueError(f"Compression.{compression.mode} supports op=Average, the global "
                         f"process set and Horovod's default options only (got {names})")
    named = _named(optimizer, named_parameters)
    compressor = make_compressor(compression.mode, _world_group(), _hvd,
                                 topk_ratio=compression.topk_ratio,
                                 powersgd_rank=compression.powersgd_rank, device=device)
    cls = type(type(optimizer).__name__, (_CompressedSync, type(optimizer)), {})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._hvdllm_setup(named, compressor, backward_passes_per_step)
    return wrapped
