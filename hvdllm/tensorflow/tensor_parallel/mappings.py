"""Tensor-parallel communication: a group handle and mirror-pair ``tf.custom_gradient`` functions.

:class:`TensorParallelGroup` runs the collectives TP needs on TensorFlow
tensors over the TP group's Horovod process set.  Horovod's TensorFlow ops
work eagerly and inside ``tf.function``, so the collectives become part of
the traced step.  Each op gets its own name, numbered in the order the
ranks trace it (every rank of the group traces the same code), so the
names agree across ranks and never clash within a graph.

The functions come in mirror pairs (forward of one is the backward of the
other), each a ``tf.custom_gradient`` with the group passed explicitly.
Horovod's own gradients are never used: the backward of each pair runs
the mirror collective itself (Horovod's registered allreduce gradient is
another allreduce, which would multiply gradients by tp).

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

The sequence axis is axis 1 of (batch, seq, features) activations.

Deadlines: an eager collective is a watchdog-bounded wait
(:mod:`hvdllm.common.watchdog`); collectives inside a traced graph are
bounded by whoever runs the graph, which brackets the call the same way.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from ...common import watchdog
from ...common.comm import Group
from ...common.errors import CommError

SEQ_AXIS = 1


class TensorParallelGroup:
    """Collectives on tensors over one TP group, plus the sequence-parallel switch.

    Args:
        group: the TP :class:`~hvdllm.common.comm.Group` of this rank; its
            ``process_set`` carries the collectives.
        sequence_parallel: split norm/dropout regions along the sequence.
        hvd: the ``horovod.tensorflow`` module (imported when None and needed).
    """

    def __init__(self, group: Group, sequence_parallel: bool = False, hvd: Any = None):
        self.group = group
        self.sequence_parallel = sequence_parallel
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

    def enter_column_region(self, x: tf.Tensor, shared: bool = False) -> tf.Tensor:
        """``x`` made ready for a column-parallel matmul.

        The whole sequence (allgather) under sequence parallelism, else an
        identity whose backward allreduces.  ``shared=True`` reuses the
        result for consecutive layers fed the very same tensor (LLaMA's q, k,
        v and gate, up), so they cost one collective each way instead of
        one per layer: their input gradients add up before the single
        reduction.  Only traced code shares (eager code may run the same
        tensor once outside and once inside a gradient tape).
        """
        if shared and self._entered is not None:
            ref, sp, entered = self._entered
            if ref is x and sp == self.sequence_parallel:
                return entered
        if self.sequence_parallel:
            entered = gather_from_sequence(x, self)
        else:
            entered = copy_to_region(x, self)
        share = shared and not tf.executing_eagerly()
        self._entered = (x, self.sequence_parallel, entered) if share else None
        return entered

    # -- transport ---------------------------------------------------------
    def _horovod(self) -> Any:
        if self.hvd is None:
            from ..distributed import import_horovod

            self.hvd = import_horovod()
        return self.hvd

    def _name(self, op: str) -> str:
        """A name for the next collective; the same on every rank that traces the same code."""
        self._calls += 1
        return f"tp.{op}.{self._calls}"

    def _run(self, op: str, x: tf.Tensor, call: Callable[[Any, str], tf.Tensor]) -> tf.Tensor:
        """``call(hvd, name)``, as a watchdog-bounded wait when it runs eagerly."""
        hvd, name = self._horovod(), self._name(op)
        if not tf.executing_eagerly():
            return call(hvd, name)
        nbytes = int(np.prod(x.shape)) * x.dtype.size
        with watchdog.current().waiting(f"tensor-parallel {op} of {x.dtype.name}"
                                        f"{list(x.shape)} (Horovod)", self.group.kind,
                                        self.group.ranks, nbytes=nbytes):
            return call(hvd, name)

    def all_reduce(self, x: tf.Tensor) -> tf.Tensor:
        """Element-wise sum over the group."""
        if self.size == 1:
            return x
        return self._run("allreduce", x, lambda hvd, name: hvd.allreduce(
            x, op=hvd.Sum, name=name, process_set=self.group.process_set,
            ignore_name_scope=True))

    def _all_gather_front(self, x: tf.Tensor) -> tf.Tensor:
        """Every rank's ``x`` concatenated along axis 0."""
        return self._run("allgather", x, lambda hvd, name: hvd.allgather(
            x, name=name, process_set=self.group.process_set, ignore_name_scope=True))

    def all_gather(self, x: tf.Tensor, axis: int) -> tf.Tensor:
        """Concatenate every rank's ``x`` along ``axis`` (equal shapes)."""
        if self.size == 1:
            return x
        rank = x.shape.rank
        axis %= rank
        gathered = self._all_gather_front(x)  # (size * d0, d1, ...)
        if axis == 0:
            return gathered
        shape = tf.shape(x)
        static = x.shape.as_list()
        if all(d == 1 for d in static[:axis]):  # nothing before axis: no reordering
            out = tf.reshape(gathered, tf.concat([shape[:axis], [-1], shape[axis + 1:]], 0))
        else:
            # (size, d0, .., d_axis, ..) -> (d0, .., size, d_axis, ..) -> merge size into d_axis
            stacked = tf.reshape(gathered, tf.concat([[self.size], shape], 0))
            perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, rank + 1))
            out = tf.reshape(tf.transpose(stacked, perm),
                             tf.concat([shape[:axis], [-1], shape[axis + 1:]], 0))
        if static[axis] is not None:
            static[axis] *= self.size
        out.set_shape(static)
        return out

    def reduce_scatter(self, x: tf.Tensor, axis: int) -> tf.Tensor:
        """Sum over the group, keeping this rank's equal part of ``axis``."""
        if self.size == 1:
            return x
        rank = x.shape.rank
        axis %= rank
        static = x.shape.as_list()
        if static[axis] is not None and static[axis] % self.size:
            raise CommError(
                f"tensor-parallel reduce-scatter: axis {axis} of shape {static} is not "
                f"divisible by the tp group size {self.size}")
        shape = tf.shape(x)
        if axis == 0:
            front = x
        elif all(d == 1 for d in static[:axis]):  # nothing before axis: no reordering
            front = tf.reshape(x, tf.concat([[shape[axis]], shape[:axis], shape[axis + 1:]], 0))
        else:
            # (d0, .., size * part, ..) -> (size, d0, .., part, ..) -> (size * d0, .., part, ..)
            split = tf.reshape(x, tf.concat([shape[:axis], [self.size, -1], shape[axis + 1:]], 0))
            perm = [axis] + list(range(axis)) + list(range(axis + 1, rank + 1))
            moved = tf.transpose(split, perm)
            front = tf.reshape(moved, tf.concat([[-1], tf.shape(moved)[2:]], 0))
        out = self._run("reducescatter", x, lambda hvd, name: hvd.reducescatter(
            front, op=hvd.Sum, name=name, process_set=self.group.process_set,
            ignore_name_scope=True))  # this rank's block of front's rows
        if axis != 0 and all(d == 1 for d in static[:axis]):
            out = tf.reshape(out, tf.concat([shape[:axis], [-1], shape[axis + 1:]], 0))
        if static[axis] is not None:
            static[axis] //= self.size
        out.set_shape(static)
        return out

    def local_part(self, x: tf.Tensor, axis: int) -> tf.Tensor:
        """This rank's equal part of ``axis`` (no communication)."""
        if self.size == 1:
            return x
        axis %= x.shape.rank
        n = x.shape[axis]
        if n is not None and n % self.size:
            raise CommError(
                f"tensor-parallel split: axis {axis} of shape {x.shape.as_list()} is not "
                f"divisible by the tp group size {self.size}")
        return tf.split(x, self.size, axis=axis)[self.rank]

    def all_reduce_grads(self, grads: Sequence[Any], variables: Sequence[Any]) -> list:
        """``grads`` with those of the replicated ``variables`` summed over the group.

        Under sequence parallelism a replicated variable (a norm, a
        row-parallel bias, the positions) saw only this rank's part of the
        sequence; the sum of the parts is its gradient.  All of them travel in
        one allreduce.  Without sequence parallelism they are already whole,
        and ``grads`` come back unchanged.

        Args:
            grads: one gradient (or None) per variable.
            variables: the variables, tagged as :mod:`.layers` tags shards.
        """
        grads = list(grads)
        if self.size == 1 or not self.sequence_parallel:
            return grads
        picked = [i for i, (g, v) in enumerate(zip(grads, variables))
                  if g is not None and not getattr(v, "hvdllm_tp_sharded", False)]
        if not picked:
            return grads
        dense = [tf.convert_to_tensor(grads[i]) for i in picked]
        flat = self.all_reduce(tf.concat([tf.reshape(g, [-1]) for g in dense], 0))
        sizes = [int(np.prod(g.shape)) for g in dense]
        for i, g, part in zip(picked, dense, tf.split(flat, sizes)):
            grads[i] = tf.reshape(part, tf.shape(g))
        return grads


# -- mirror pairs ------------------------------------------------------------
def _mirror(forward: Callable[[tf.Tensor], tf.Tensor],
            backward: Callable[[tf.Tensor], tf.Tensor]) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function with ``forward`` as its value and ``backward`` as its gradient."""

    @tf.custom_gradient
    def mapping(x):
        return forward(x), backward

    return mapping


def copy_to_region(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Identity forward, allreduce backward (enter a column-parallel region)."""
    if tp.size == 1:
        return x
    return _mirror(tf.identity, tp.all_reduce)(x)


def reduce_from_region(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Allreduce forward, identity backward (leave a row-parallel region)."""
    if tp.size == 1:
        return x
    return _mirror(tp.all_reduce, tf.identity)(x)


def scatter_to_region(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Keep this rank's slice of the last axis; allgather its gradient."""
    if tp.size == 1:
        return x
    return _mirror(lambda t: tp.local_part(t, -1), lambda g: tp.all_gather(g, -1))(x)


def gather_from_region(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Allgather along the last axis; keep this rank's slice of the gradient."""
    if tp.size == 1:
        return x
    return _mirror(lambda t: tp.all_gather(t, -1), lambda g: tp.local_part(g, -1))(x)


def scatter_to_sequence(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Keep this rank's part of the sequence; allgather the gradient."""
    if tp.size == 1:
        return x
    return _mirror(lambda t: tp.local_part(t, SEQ_AXIS),
                   lambda g: tp.all_gather(g, SEQ_AXIS))(x)


def gather_from_sequence(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Allgather the sequence; reduce-scatter the gradient.

    The consumer is a column-parallel layer whose input gradient is a
    partial sum on each rank: the backward sums it and keeps this rank's part.
    """
    if tp.size == 1:
        return x
    return _mirror(lambda t: tp.all_gather(t, SEQ_AXIS),
                   lambda g: tp.reduce_scatter(g, SEQ_AXIS))(x)


def reduce_scatter_to_sequence(x: tf.Tensor, tp: TensorParallelGroup) -> tf.Tensor:
    """Sum over the group keeping this rank's part of the sequence; allgather the gradient."""
    if tp.size == 1:
        return x
    return _mirror(lambda t: tp.reduce_scatter(t, SEQ_AXIS),
                   lambda g: tp.all_gather(g, SEQ_AXIS))(x)
