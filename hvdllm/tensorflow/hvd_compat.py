"""The ``horovod.tensorflow`` API, working on Keras 3, with hvdllm's gradient compressions.

Reached through ``import hvdllm.tensorflow as hvd``: a script written for
``horovod.tensorflow`` runs with only that import swapped.

* ``init(comm=None, process_sets=None, timeout=None, watchdog=True)``
  applies hvdllm's Horovod settings (cycle time, stall deadline; values the
  user exported win), starts hvdllm's hang watchdog
  (:mod:`hvdllm.common.watchdog`) and then calls Horovod's ``init``.
  ``timeout`` (seconds; else ``$HVDLLM_TIMEOUT_SEC``, else
  :data:`DEFAULT_TIMEOUT_SEC`) bounds every eager wait on other ranks:
  Horovod's start-up, the collectives served here and the gradient
  averaging of :func:`DistributedGradientTape`.  A wait longer than that
  prints a report naming the likeliest culprit rank, writes
  ``hang-rank-K.json`` and ends the job.  Gradient reductions traced into a
  graph (the tape in a ``tf.function``, the Keras ``DistributedOptimizer``
  in ``fit``) tell the watchdog when they start and end through two host
  callbacks; other collectives a user traces run out of its sight, and
  Horovod's stall shutdown (at twice the deadline) bounds those.
* Horovod's raw collectives (``allreduce``, ``allgather``, ``broadcast``,
  ``alltoall``, ``reducescatter``, ``grouped_*``, ``broadcast_object``,
  ``allgather_object``, ``join``) are Horovod's own: they work on Keras 3,
  eagerly and inside ``tf.function``.  ``barrier`` is added (Horovod's
  TensorFlow module has none).
* :func:`broadcast_variables` and :func:`DistributedGradientTape` are
  hvdllm's: Horovod's fail on Keras 3 variables.  The tape averages all
  dense gradients of one dtype in one fused allreduce (Horovod's
  ``Compression.none``/``fp16``), or with an hvdllm compressor
  (:mod:`hvdllm.tensorflow.compression`) for ``Compression.bf16``,
  ``topk(ratio)`` and ``powersgd(rank)``.
* :class:`SyncBatchNormalization` is hvdllm's (Horovod's fails on Keras 3).
* ``DistributedOptimizer`` serves legacy ``tf.compat.v1`` optimizers only;
  a Keras 3 optimizer gets a one-line error pointing to the tape.
* Before :func:`init`, every collective, rank/size query and the tape are
  refused with a one-line error saying to call ``init()`` first (also
  inside ``tf.function``: these errors pass AutoGraph unchanged).
* Every other name is Horovod's.

This module imports Horovod and TensorFlow when it is imported;
:mod:`hvdllm.tensorflow` imports it only on first use of a Horovod name.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common import watchdog as _watchdog
from ..common.comm import Group
from ..common.compression import DEFAULT_POWERSGD_RANK, DEFAULT_TOPK_RATIO, check_compression
from ..common.launch import start_horovod
from .compression import GradientCompressor, make_compressor
from .distributed import import_horovod

_hvd = import_horovod()
DEFAULT_TIMEOUT_SEC = 300.0

Average, Sum, Adasum = _hvd.Average, _hvd.Sum, _hvd.Adasum
global_process_set = _hvd.global_process_set


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)
    return getattr(_hvd, name)


_timeout_sec = DEFAULT_TIMEOUT_SEC
# Horovod calls that need init(): refused before it with a one-line error.
_NEED_INIT = ("size", "local_size", "cross_size", "rank", "local_rank", "cross_rank",
              "is_homogeneous", "rank_op", "local_rank_op", "size_op", "local_size_op",
              "process_set_included_op", "add_process_set", "remove_process_set",
              "start_timeline", "stop_timeline", "mpi_threads_supported", "broadcast_object_fn")
# Horovod collectives: refused before init(), and watchdog-bounded waits when eager.
_COLLECTIVES = ("allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast",
                "broadcast_", "alltoall", "reducescatter", "grouped_reducescatter",
                "broadcast_object", "allgather_object", "join")


class NotInitializedError(ValueError):
    """A Horovod name used before ``hvd.init()``."""

    # AutoGraph re-raises errors from traced code with the trace prepended;
    # these one-line errors pass through unchanged.
    ag_pass_through = True


class UnsupportedError(TypeError, ValueError):
    """A compression, op or option the chosen path cannot do (one line, naming it)."""

    ag_pass_through = True


class ShapeMismatchError(ValueError):
    """Ranks sent tensors of different shapes to one collective (one line, naming them)."""

    ag_pass_through = True


def _describe_mismatch(what: str, shapes: list[Any], names: list[str] | None,
                       process_set: Any) -> str:
    """One line naming the ranks whose tensor shapes differ, found by an allgather of them.

    Called on every rank of ``process_set`` after Horovod refused a
    collective for mismatched shapes (Horovod reports it to all of them).
    """
    ranks = _set_ranks(process_set)
    everyone = _hvd.allgather_object([list(s) for s in shapes], process_set=process_set)
    first = everyone[0]
    for r, theirs in zip(ranks[1:], everyone[1:]):
        if len(theirs) != len(first):
            return (f"{what}: rank {ranks[0]} sent {len(first)} tensors, rank {r} sent "
                    f"{len(theirs)}")
        for i, (a, b) in enumerate(zip(first, theirs)):
            if a != b:
                which = "" if len(first) == 1 else (
                    f" (tensor {i}{f' {names[i]!r}' if names else ''})")
                return f"{what}{which}: rank {ranks[0]} sent shape {a}, rank {r} sent shape {b}"
    return f"{what}: tensor shapes differ across ranks {list(ranks)}"


def _in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (``jit_compile=True``)."""
    if tf.executing_eagerly():
        return False
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


# Waits registered from inside graphs, by token, until their end callback runs.
_graph_waits: dict[int, Any] = {}


def _graph_wait_begin(op: str, process_set: Any, after: list[Any]) -> tf.Tensor:
    """A graph op that, when run (after ``after``), opens a watchdog wait; returns its token."""
    kind = "world" if process_set is _hvd.global_process_set else "process set"

    def begin() -> np.ndarray:
        count_step()
        event = _watchdog.current().begin(op, kind, _set_ranks(process_set))
        token = -1 if event is None else event.seq
        if event is not None:
            _graph_waits[token] = event
        return np.int64(token)

    deps = [t.values if isinstance(t, tf.IndexedSlices) else t for t in after]
    with tf.control_dependencies(deps):
        return tf.numpy_function(begin, [], tf.int64, stateful=True, name="hvdllm_wait_begin")


def _graph_wait_end(token: tf.Tensor, after: list[Any]) -> tf.Tensor:
    """A graph op that, when run (after ``after``), closes the wait ``token`` opened."""

    def end(seq: np.ndarray) -> np.ndarray:
        _watchdog.current().end(_graph_waits.pop(int(seq), None))
        return np.int64(0)

    deps = [t.values if isinstance(t, tf.IndexedSlices) else t for t in after]
    with tf.control_dependencies(deps):
        return tf.numpy_function(end, [token], tf.int64, stateful=True, name="hvdllm_wait_end")


def _is_shape_mismatch(exc: BaseException) -> bool:
    return isinstance(exc, tf.errors.OpError) and "Mismatched" in str(exc) and (
        "shape" in str(exc) or "dimension" in str(exc))


def _require_init(what: str) -> None:
    if not _hvd.is_initialized():
        raise NotInitializedError(f"hvd.{what}: Horovod is not initialized; call hvd.init() first")


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


def _not_converted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Kept out of AutoGraph: plain Python around TensorFlow ops, no tensor-dependent control."""
    return tf.autograph.experimental.do_not_convert(fn)


def _set_ranks(process_set: Any) -> tuple[int, ...]:
    ranks = getattr(process_set, "ranks", None)
    return tuple(ranks) if ranks else tuple(range(_hvd.size()))


def _bounded_wait(op: str, process_set: Any = None):
    """A watchdog-registered wait when eager; nothing while a graph is traced."""
    if not tf.executing_eagerly():
        return contextlib.nullcontext()
    if process_set is None:
        process_set = _hvd.global_process_set
    kind = "world" if process_set is _hvd.global_process_set else "process set"
    return _watchdog.current().waiting(op, kind, _set_ranks(process_set))


def _needs_init(name: str) -> Callable[..., Any]:
    fn = getattr(_hvd, name)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        _require_init(name)
        return fn(*args, **kwargs)

    return call


def _collective(name: str) -> Callable[..., Any]:
    """Horovod's collective ``name``: refused before init, a bounded wait when eager."""
    fn = getattr(_hvd, name)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        _require_init(name)
        compression = kwargs.get("compression")
        if isinstance(compression, CompressionSpec):
            compression.compress(None)  # raises: a single collective cannot take it
        process_set = kwargs.get("process_set", _hvd.global_process_set)
        with _bounded_wait(f"horovod.tensorflow.{name}", process_set):
            try:
                return fn(*args, **kwargs)
            except tf.errors.OpError as exc:
                if not (_is_shape_mismatch(exc) and tf.executing_eagerly() and args):
                    raise
                tensors = tf.nest.flatten(args[0])
                label = kwargs.get("name") or (args[1] if name == "allreduce" and len(args) > 1
                                               and isinstance(args[1], str) else None)
                what = f"hvd.{name}" + (f" {label!r}" if label else "")
                message = _describe_mismatch(what, [t.shape for t in tensors], None, process_set)
            raise ShapeMismatchError(message)

    return call


for _name in _NEED_INIT:
    globals()[_name] = _needs_init(_name)
for _name in _COLLECTIVES:
    globals()[_name] = _collective(_name)


def barrier(process_set: Any = global_process_set) -> None:
    """Wait until every rank of ``process_set`` reached this call (eager)."""
    _require_init("barrier")
    with _bounded_wait("horovod.tensorflow barrier", process_set):
        _hvd.allreduce(tf.zeros([1]), op=_hvd.Sum, name="hvdllm.barrier",
                       process_set=process_set).numpy()


@dataclass(frozen=True)
class CompressionSpec:
    """An hvdllm gradient compression for :func:`DistributedGradientTape`.

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

    def compress(self, tensor: Any) -> Any:
        raise UnsupportedError(f"Compression.{self.mode} works with DistributedGradientTape "
                               f"only; a single collective takes Compression.none or fp16")

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


def _value(variable: Any) -> tf.Tensor:
    if isinstance(variable, keras.Variable):
        return variable.value
    return tf.convert_to_tensor(variable)


# Types Horovod does not move, and the same-width types their bits travel as.
_WIRE_BITS = {tf.uint32: tf.int32, tf.uint64: tf.int64}


def _to_wire(t: tf.Tensor) -> tf.Tensor:
    if t.dtype == tf.bool:
        return tf.cast(t, tf.uint8)
    return tf.bitcast(t, _WIRE_BITS[t.dtype]) if t.dtype in _WIRE_BITS else t


def _from_wire(t: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if dtype == tf.bool:
        return tf.cast(t, tf.bool)
    return tf.bitcast(t, dtype) if dtype in _WIRE_BITS else t


@_not_converted
def broadcast_variables(variables: Iterable[Any], root_rank: int,
                        process_set: Any = global_process_set, inplace: bool = False) -> Any:
    """Copy ``variables`` from ``root_rank`` to every rank of ``process_set``, in place.

    Takes Keras 3 variables (``model.variables``, ``optimizer.variables``)
    as well as ``tf.Variable``, of any dtype (bool and unsigned ones travel
    as Horovod-supported types).  Variables travel in one flat buffer per
    dtype, so the call costs one negotiation per dtype; works eagerly and
    inside ``tf.function``.

    Args:
        variables: the same variables, in the same order, on every rank.
        root_rank: global rank whose values win (Horovod's meaning, also
            within a process set).
        process_set: Horovod process set; the global one by default.
        inplace: Horovod's option; accepted and ignored (the copy is in place).
    """
    _require_init("broadcast_variables")
    variables = list(variables)
    if not variables or process_set.size() == 1:
        return None
    by_dtype: dict[tf.DType, list[Any]] = {}
    for v in variables:
        by_dtype.setdefault(tf.as_dtype(v.dtype), []).append(v)
    assigns = []
    with _bounded_wait("broadcast_variables", process_set):
        for dtype, group in by_dtype.items():
            flat = tf.concat([tf.reshape(_to_wire(_value(v)), [-1]) for v in group], axis=0)
            flat = _hvd.broadcast(flat, root_rank=root_rank,
                                  name=f"hvdllm.broadcast_variables.{dtype.name}."
                                       f"{len(group)}.{sum(int(np.prod(v.shape)) for v in group)}",
                                  process_set=process_set)
            sizes = [int(np.prod(v.shape)) for v in group]
            for v, part in zip(group, tf.split(flat, sizes)):
                assigns.append(v.assign(_from_wire(tf.reshape(part, v.shape), dtype)))
    return None if tf.executing_eagerly() else tf.group(*[a for a in assigns if a is not None])


def _world_group() -> Group:
    """An hvdllm group of every rank, over Horovod's global process set."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return Group("dp", world, range(world.Get_size()), timeout_sec=_timeout_sec,
                 process_set=_hvd.global_process_set)


def _source_names(sources: Sequence[Any]) -> list[str]:
    """Stable unique names of the tape's sources (compressor state keys)."""
    return [f"{i}:{getattr(s, 'path', None) or getattr(s, 'name', 'tensor')}"
            for i, s in enumerate(sources)]


class GradientReducer:
    """Reduces a list of gradients over a process set, as Horovod's wrappers do.

    Shared by :func:`DistributedGradientTape` and the Keras
    ``DistributedOptimizer`` (:mod:`hvdllm.tensorflow.keras`).  Dense
    gradients of one dtype travel in one fused allreduce (Horovod's
    ``Compression.none``/``fp16``; Adasum: one allreduce each) or through an
    hvdllm compressor; ``tf.IndexedSlices`` travel as Horovod's sparse
    allreduce unless ``sparse_as_dense``.
    """

    def __init__(self, compression: Any, op: Any, gradient_predivide_factor: float,
                 process_set: Any, sparse_as_dense: bool, scale_local_gradients: bool,
                 what: str) -> None:
        if compression in (Compression.topk, Compression.powersgd):
            compression = compression()
        _check_reduce_options(what, compression, op, gradient_predivide_factor, process_set)
        self.compression = compression
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.process_set = process_set
        self.sparse_as_dense = sparse_as_dense
        self.scale_local_gradients = scale_local_gradients
        self.what = what
        self.compressor = (_compressor(compression) if isinstance(compression, CompressionSpec)
                           else None)
        self.local: set[int] = set()

    def reduce(self, sources: list[Any], grads: list[Any]) -> list[Any]:
        """``grads`` (one per source, ``None`` allowed) reduced over the process set."""
        size = self.process_set.size()
        out = list(grads)
        todo = [i for i, (s, g) in enumerate(zip(sources, grads))
                if g is not None and id(s) not in self.local]
        for i, (s, g) in enumerate(zip(sources, grads)):
            if g is not None and id(s) in self.local and self.scale_local_gradients:
                out[i] = (tf.IndexedSlices(g.values / size, g.indices, g.dense_shape)
                          if isinstance(g, tf.IndexedSlices) else g / size)
        if self.sparse_as_dense or self.compressor is not None:
            for i in todo:
                if isinstance(out[i], tf.IndexedSlices):
                    out[i] = tf.convert_to_tensor(out[i])
        if not todo or size == 1 and self.compressor is None:
            return out
        if _in_xla_context():
            raise UnsupportedError(f"{self.what}: Horovod's collectives cannot be compiled by "
                                   f"XLA; compile the model with jit_compile=False")
        sparse = [i for i in todo if isinstance(out[i], tf.IndexedSlices)]
        dense = [i for i in todo if i not in sparse]
        if not tf.executing_eagerly():
            return self._traced_reduce(sources, out, dense, sparse)
        try:
            reduced = self._reduce_dense_and_sparse(sources, out, dense, sparse)
        except tf.errors.OpError as exc:
            if not (_is_shape_mismatch(exc) and tf.executing_eagerly()):
                raise
            message = _describe_mismatch(
                f"{self.what} gradient reduction", [out[i].shape for i in todo],
                [_source_names([sources[i]])[0].split(":", 1)[1] for i in todo],
                self.process_set)
            raise ShapeMismatchError(message) from None
        for i, g in zip(dense, reduced):
            out[i] = g
        return out

    def _traced_reduce(self, sources: list[Any], out: list[Any], dense: list[int],
                       sparse: list[int]) -> list[Any]:
        """The reduction as graph ops, bracketed by the watchdog when the graph runs.

        Two small host callbacks around the collectives tell the watchdog
        that this rank starts (and ends) waiting on the process set, so a
        frozen peer inside a ``tf.function`` or Keras ``fit`` step is
        reported at the deadline like an eager wait (Horovod's own stall
        shutdown cannot act once a rank is frozen).
        """
        todo = dense + sparse
        token = _graph_wait_begin(f"{self.what} gradient reduction", self.process_set,
                                  [out[i] for i in todo])
        with tf.control_dependencies([token]):
            for i in todo:
                out[i] = (tf.IndexedSlices(tf.identity(out[i].values), out[i].indices,
                                           out[i].dense_shape)
                          if isinstance(out[i], tf.IndexedSlices) else tf.identity(out[i]))
        reduced = self._reduce_dense_and_sparse(sources, out, dense, sparse)
        for i, g in zip(dense, reduced):
            out[i] = g
        done = _graph_wait_end(token, [out[i] for i in todo])
        with tf.control_dependencies([done]):
            for i in todo:
                out[i] = (tf.IndexedSlices(tf.identity(out[i].values), out[i].indices,
                                           out[i].dense_shape)
                          if isinstance(out[i], tf.IndexedSlices) else tf.identity(out[i]))
        return out

    def _reduce_dense_and_sparse(self, sources: list[Any], out: list[Any], dense: list[int],
                                 sparse: list[int]) -> list[Any]:
        """Reduce ``out[sparse]`` in place; return the reduced ``out[dense]``."""
        with _bounded_wait(f"{self.what} gradient reduction", self.process_set):
            for i in sparse:
                out[i] = _hvd.allreduce(out[i], op=self.op, process_set=self.process_set,
                                        name=f"hvdllm.grad.sparse.{i}" if tf.executing_eagerly()
                                        else None)
            if self.compressor is not None:
                reduced = self._compressed([sources[i] for i in dense], [out[i] for i in dense])
            else:
                reduced = self._allreduced([out[i] for i in dense])
        return reduced

    def _allreduced(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Horovod's path: one fused allreduce per dtype (Adasum: one allreduce per tensor)."""
        prescale = postscale = 1.0
        if self.op == _hvd.Average and self.gradient_predivide_factor != 1.0:
            prescale = 1.0 / self.gradient_predivide_factor
            postscale = self.gradient_predivide_factor
        if self.op == _hvd.Adasum:
            # Per-tensor arithmetic, so the tensors stay apart; one allreduce
            # each (Horovod's grouped allreduce fails with Adasum).
            out = []
            for i, g in enumerate(grads):
                wire, ctx = self.compression.compress(g)
                wire = _hvd.allreduce(wire, op=self.op, process_set=self.process_set,
                                      name=f"hvdllm.grad.adasum.{i}")
                out.append(self.compression.decompress(wire, ctx))
            return out
        out: list[Any] = [None] * len(grads)
        by_dtype: dict[tf.DType, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            parts = [grads[i] for i in idx]
            sizes = [int(np.prod(g.shape)) for g in parts]
            flat = tf.concat([tf.reshape(g, [-1]) for g in parts], axis=0)
            wire, ctx = self.compression.compress(flat)
            wire = _hvd.allreduce(wire, op=self.op, prescale_factor=prescale,
                                  postscale_factor=postscale, process_set=self.process_set,
                                  name=f"hvdllm.grad.{dtype.name}.{len(parts)}.{sum(sizes)}")
            flat = self.compression.decompress(wire, ctx)
            for i, g, part in zip(idx, parts, tf.split(flat, sizes)):
                out[i] = tf.reshape(part, g.shape)
        return out

    def _compressed(self, sources: list[Any], grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """hvdllm's path: the compressor's average (as fp32), cast back to each gradient's dtype."""
        fp32 = [tf.cast(g, tf.float32) for g in grads]
        if tf.executing_eagerly():
            averaged = self.compressor.reduce(fp32, _source_names(sources))
        elif self.compressor.mode == "bf16":  # stateless: its graph code runs in the caller's
            averaged = self.compressor._half_graph(fp32)
        else:
            raise UnsupportedError(f"Compression.{self.compressor.mode} keeps state between "
                                   f"steps and runs eagerly only ({self.what}); reduce outside "
                                   f"tf.function (Keras: compile(run_eagerly=True)), or use "
                                   f"Compression.none, fp16 or bf16 there")
        return [tf.cast(a, g.dtype) for a, g in zip(averaged, grads)]


class _DistributedTape:
    """Mixed into the wrapped tape's class: ``gradient()`` returns reduced gradients."""

    _hvdllm_reducer: GradientReducer

    def __getattr__(self, name: str) -> Any:
        # Horovod's tape attributes (compression, op, process_set, ...) read through.
        reducer = self.__dict__.get("_hvdllm_reducer")
        if reducer is not None and name in ("compression", "op", "gradient_predivide_factor",
                                            "process_set", "sparse_as_dense",
                                            "scale_local_gradients", "compressor"):
            return getattr(reducer, name)
        raise AttributeError(name)

    def register_local_source(self, source: Any) -> None:
        """Leave ``source``'s gradient local (divided by the set's size, as Horovod does)."""
        self._hvdllm_reducer.local.add(id(source))

    @_not_converted
    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE,
                 use_generic_names: bool = False) -> Any:
        """This rank's gradients (``tf.GradientTape.gradient``), reduced over the process set.

        ``sources`` may be any nest (list, dict) of variables; the result
        has its structure.  ``None`` gradients stay ``None``.
        """
        _require_init("DistributedGradientTape.gradient")
        grads = super().gradient(target, sources, output_gradients=output_gradients,
                                 unconnected_gradients=unconnected_gradients)
        flat_sources = tf.nest.flatten(sources)
        flat_grads = tf.nest.flatten(grads, expand_composites=False)
        if tf.executing_eagerly():
            count_step()
        reduced = self._hvdllm_reducer.reduce(flat_sources, flat_grads)
        return tf.nest.pack_sequence_as(grads, reduced) if tf.nest.is_nested(grads) else reduced[0]

    def get_local_and_global_gradients(self, target: Any, sources: Sequence[Any],
                                       output_gradients: Any = None,
                                       use_generic_names: bool = False) -> tuple[list, list]:
        """Horovod's: (local (source, grad) pairs, global (source, grad) pairs)."""
        grads = self.gradient(target, sources, output_gradients=output_gradients)
        pairs = list(zip(sources, grads))
        local = self._hvdllm_reducer.local
        return ([p for p in pairs if id(p[0]) in local],
                [p for p in pairs if id(p[0]) not in local])


def count_step() -> None:
    """Tell the watchdog that step n (1-based: eager gradient reductions) begins."""
    global _steps
    _steps += 1
    _watchdog.current().set_step(_steps)


_steps = 0


# One compressor per compression: its state (error feedback, PowerSGD's Q)
# outlives the tapes, which a training loop creates anew every step.
_compressors: dict[CompressionSpec, GradientCompressor] = {}


def _compressor(spec: CompressionSpec) -> GradientCompressor:
    """The compressor of ``spec``, made on first use and kept for later tapes."""
    if spec not in _compressors:
        _compressors[spec] = make_compressor(spec.mode, _world_group(), _hvd,
                                             topk_ratio=spec.topk_ratio,
                                             powersgd_rank=spec.powersgd_rank)
    return _compressors[spec]


def _check_reduce_options(what: str, compression: Any, op: Any,
                          gradient_predivide_factor: float, process_set: Any) -> None:
    if gradient_predivide_factor != 1.0 and op != _hvd.Average:
        raise UnsupportedError(f"{what}: gradient_predivide_factor needs op=Average")
    if op not in (_hvd.Average, _hvd.Sum, _hvd.Adasum):
        raise UnsupportedError(f"{what}: op {op!r} is not a gradient reduction; use op=Average, "
                               f"Sum or Adasum")
    if not (compression in (Compression.none, Compression.fp16)
            or isinstance(compression, CompressionSpec)):
        raise UnsupportedError(f"{what}: compression {compression!r} is not one of "
                               f"Compression.none, fp16, bf16, topk(ratio), powersgd(rank)")
    if isinstance(compression, CompressionSpec):
        unsupported = {"op": op != _hvd.Average,
                       "process_set": process_set is not _hvd.global_process_set,
                       "gradient_predivide_factor": gradient_predivide_factor != 1.0}
        if any(unsupported.values()):
            names = ", ".join(k for k, bad in unsupported.items() if bad)
            raise UnsupportedError(f"Compression.{compression.mode} supports op=Average, the "
                                   f"global process set and gradient_predivide_factor=1 only "
                                   f"(got {names})")


@_not_converted
def DistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "",
                            device_sparse: str = "", compression: Any = Compression.none,
                            sparse_as_dense: bool = False, op: Any = Average,
                            gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                            groups: Any = None, process_set: Any = global_process_set,
                            scale_local_gradients: bool = True) -> tf.GradientTape:
    """Wrap ``gradtape`` so that ``gradient()`` returns gradients reduced over all ranks.

    The arguments are Horovod's, in Horovod's order; works on Keras 3
    variables, eagerly and inside ``tf.function``.  The result is an
    instance of ``gradtape``'s class sharing its recording.

    Args:
        gradtape: a ``tf.GradientTape`` (recorded, or to be entered).
        device_dense, device_sparse: Horovod's; ignored (the CPU/GPU
            placement of the gradients is kept).
        compression: ``Compression.none``/``fp16`` (one fused allreduce per
            dtype) or ``Compression.bf16``/``topk(ratio)``/``powersgd(rank)``
            (hvdllm's compressors; topk and powersgd keep state and run
            eagerly only).  One compressor serves every tape given an equal
            compression, so its state carries from step to step; it is
            keyed by the sources' positions and paths.
        sparse_as_dense: densify ``tf.IndexedSlices`` gradients (otherwise
            they travel as Horovod's allgather of values and indices).
        op: ``Average`` (default), ``Sum`` or ``Adasum`` (hvdllm compressions:
            Average only).
        gradient_predivide_factor: with Average, divide by this before the sum
            and by ``size / factor`` after it.
        num_groups, groups: Horovod's grouping hints; ignored (all gradients
            of one dtype already travel together).
        process_set: Horovod process set; the global one by default (the
            only one hvdllm's compressions support).
        scale_local_gradients: divide gradients of sources registered with
            ``register_local_source`` by the set's size, as Horovod does.
    """
    _require_init("DistributedGradientTape")
    reducer = GradientReducer(compression, op, gradient_predivide_factor, process_set,
                              sparse_as_dense, scale_local_gradients, "DistributedGradientTape")
    cls = type(type(gradtape).__name__, (_DistributedTape, type(gradtape)), {})
    tape = cls.__new__(cls)
    tape.__dict__.update(gradtape.__dict__)
    tape._hvdllm_reducer = reducer
    return tape


@_not_converted
def PartialDistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "",
                                   device_sparse: str = "", compression: Any = Compression.none,
                                   sparse_as_dense: bool = False, op: Any = Average,
                                   gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                                   groups: Any = None, process_set: Any = global_process_set,
                                   local_layers: Any = None,
                                   scale_local_gradients: bool = True) -> tf.GradientTape:
    """:func:`DistributedGradientTape` leaving the gradients of ``local_layers`` local.

    Args:
        local_layers: a Keras layer or a list of them whose trainable
            variables are not reduced.
        others: as :func:`DistributedGradientTape`.
    """
    tape = DistributedGradientTape(gradtape, device_dense, device_sparse, compression,
                                   sparse_as_dense, op, gradient_predivide_factor, num_groups,
                                   groups, process_set, scale_local_gradients)
    if local_layers is None:
        local_layers = []
    elif isinstance(local_layers, keras.layers.Layer):
        local_layers = [local_layers]
    if not all(isinstance(layer, keras.layers.Layer) for layer in local_layers):
        raise ValueError("PartialDistributedGradientTape: local_layers must be Keras layers")
    for layer in local_layers:
        for v in layer.trainable_weights:
            tape.register_local_source(v)
    return tape


class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose training statistics span every rank of a process set.

    Horovod's layer of this name fails on Keras 3 (it passes ``fused`` to
    Keras 3's ``BatchNormalization`` and overrides a ``_moments`` of another
    signature).  This one overrides Keras 3's ``_moments``: each rank sums
    its inputs, their squares and their count over the reduced axes (mask
    respected), one in-graph allreduce (Sum) adds those over the ranks, and
    the mean and variance follow; the allreduce's gradient (a Sum) carries
    the backward pass across ranks, so gradients equal one process
    normalizing the global batch.  Inference uses the moving statistics,
    which stay equal on every rank.

    Args:
        fused: Horovod's; must be False (Keras 3 has no fused kernel).
        process_set: the ranks to synchronize over (all by default).
        **kwargs: ``keras.layers.BatchNormalization``'s.
    """

    def __init__(self, fused: bool = False, process_set: Any = global_process_set,
                 **kwargs: Any) -> None:
        if fused:
            raise UnsupportedError("SyncBatchNormalization: fused=True is not available on "
                                   "Keras 3; leave fused=False")
        kwargs.pop("synchronized", None)  # tf.distribute's; this layer synchronizes itself
        super().__init__(**kwargs)
        self.process_set = process_set

    def _moments(self, inputs: Any, mask: Any) -> tuple[Any, Any]:
        _require_init("SyncBatchNormalization")
        if self.process_set.size() == 1:
            return super()._moments(inputs, mask)
        axes = self._reduction_axes
        if mask is None:
            weights = tf.ones_like(inputs)
        else:
            weights = tf.cast(tf.broadcast_to(tf.expand_dims(mask, -1), tf.shape(inputs)),
                              inputs.dtype)
        local = tf.stack([tf.reduce_sum(inputs * weights, axes),
                          tf.reduce_sum(tf.square(inputs) * weights, axes),
                          tf.reduce_sum(weights, axes)])
        total = _hvd.allreduce(local, op=_hvd.Sum, process_set=self.process_set)
        count = tf.maximum(total[2], 1.0)
        mean = total[0] / count
        variance = tf.maximum(total[1] / count - tf.square(mean), 0.0)
        return mean, variance

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("synchronized", None)
        return config


def DistributedOptimizer(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """Horovod's ``DistributedOptimizer`` for legacy ``tf.compat.v1`` optimizers only.

    A Keras 3 optimizer gets a one-line error: Horovod's wrapper fails on
    Keras 3 variables; average gradients with :func:`DistributedGradientTape`.
    """
    _require_init("DistributedOptimizer")
    if isinstance(optimizer, keras.optimizers.Optimizer):
        raise UnsupportedError(f"hvd.DistributedOptimizer does not wrap Keras 3 optimizers "
                               f"({type(optimizer).__name__}); average the gradients with "
                               f"hvd.DistributedGradientTape(tape) before "
                               f"optimizer.apply_gradients")
    return _hvd.DistributedOptimizer(optimizer, *args, **kwargs)
