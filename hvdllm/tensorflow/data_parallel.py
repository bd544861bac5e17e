"""Data-parallel gradient reduction and parameter broadcast (TensorFlow).

The TensorFlow engine sums the gradients of all micro-batches locally in
one ``tf.function`` first and only then reduces them over the DP group,
once per step, so accumulation costs no traffic.

* :class:`InPlaceSum` (``train.reduce_op = "average"``, the default path):
  the gradients arrive as one flat float32 tensor (the engine's gradient
  graph concatenates them, :func:`flatten_gradients`), which is summed in
  place by one MPI ``Allreduce`` on the DP group's own communicator,
  between graph calls, and then split into views of the same memory.  No
  fresh output buffer, no copy in or out, no scaling pass: the 1/dp of
  the average is folded into the unscaling the optimizer step applies
  anyway (:class:`hvdllm.tensorflow.update.GradientUpdate`).
* :func:`allreduce_gradients`: a Horovod allreduce inside a graph, average
  (one fused flat buffer) or Adasum (each gradient its own tensor, since
  Adasum's projections are per parameter).

Horovod's Keras API is not used: it does not support Keras 3 variables.
Compression, ZeRO-1, loss scaling and clipping build on this in
:mod:`hvdllm.tensorflow.update`; :class:`TracedFunction` is the traced-once
graph wrapper they share.
"""
from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common import watchdog
from ..common.comm import Group


class TracedFunction:
    """A ``tf.function`` traced on its first call; later calls skip argument matching.

    For graphs whose arguments keep their shapes and dtypes (a training
    step's gradients): calling the traced graph directly avoids
    ``tf.function``'s per-call signature matching, a fixed cost that shows
    on small models.  Pass tensors, not Python numbers, for values that
    change between calls.

    Args:
        fn: the Python function to trace.
    """

    def __init__(self, fn: Any):
        self.function = tf.function(fn)
        self.concrete: Any = None

    def __call__(self, *args: Any) -> Any:
        if self.concrete is None:
            self.concrete = self.function.get_concrete_function(*args)
        return self.concrete(*args)


def flatten_gradients(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """Every gradient flattened and concatenated into one float32 vector (graph or eager)."""
    return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads], axis=0)


@tf.autograph.experimental.do_not_convert  # plain Python over a list, Horovod's code inside
def allreduce_gradients(grads: Sequence[tf.Tensor], group: Group, hvd: Any,
                        op: str = "average") -> list[tf.Tensor]:
    """Average (or Adasum) ``grads`` over ``group`` with Horovod; identity for a group of one.

    Call it inside a ``tf.function``, so the allreduce is part of the
    graph.  Every rank of the group must pass tensors of the same shapes in
    the same order.

    Args:
        grads: dense gradients, one per trainable variable.
        group: the data-parallel group; its ``process_set`` is used.
        hvd: the ``horovod.tensorflow`` module.
        op: "average" (one fused flat buffer) or "adasum" (Horovod's Adasum
            per gradient tensor: layer-wise projections, as in torch).
    """
    if group.size == 1:
        return list(grads)
    grads = list(grads)
    if op == "adasum":
        return [hvd.allreduce(g, op=hvd.Adasum, name=f"{group.kind}.adasum.{i}",
                              process_set=group.process_set) for i, g in enumerate(grads)]
    if op != "average":
        raise ValueError(f"unknown gradient reduction {op!r}; expected 'average' or 'adasum'")
    flat = hvd.allreduce(flatten_gradients(grads), op=hvd.Average, name=f"{group.kind}.grads",
                         process_set=group.process_set)
    sizes = [int(np.prod(g.shape)) for g in grads]
    return [tf.reshape(part, g.shape) for part, g in zip(tf.split(flat, sizes), grads)]


class InPlaceSum:
    """Sum a flat float32 gradient tensor over ``group`` in its own memory.

    :meth:`sum_` runs one blocking MPI ``Allreduce(IN_PLACE, SUM)`` on the
    group's communicator over the tensor's buffer, registered as a wait of
    the hang watchdog.  ``__call__(flat)`` also returns the per-variable
    gradients: views of the result (``tf.split`` along axis 0 and
    ``tf.reshape`` share the buffer on the CPU), cut in one traced graph,
    since one eager reshape per variable would cost more than the split.
    The trainer skips even that call: its optimizer graph takes the flat
    sum and cuts it itself (:meth:`split_graph`).  The tensor must be a buffer
    nobody else holds: a fresh output of the gradient graph (a
    concatenation of two or more tensors, or a sum), never a variable's
    value or a constant, in host memory.

    Args:
        shapes: the variables' shapes, in the order of the flat layout.
        group: the data-parallel group (its ``comm``).
    """

    def __init__(self, shapes: Sequence[Any], group: Group):
        self.shapes = [tf.TensorShape(s) for s in shapes]
        self.sizes = [int(s.num_elements()) for s in self.shapes]
        self.numel = sum(self.sizes)
        self.group = group
        self._split = TracedFunction(self.split_graph)

    def split_graph(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """The per-variable views of ``flat``, for use inside a ``tf.function``."""
        return [tf.reshape(part, shape)
                for part, shape in zip(tf.split(flat, self.sizes), self.shapes)]

    def __call__(self, flat: tf.Tensor) -> list[tf.Tensor]:
        return self.split(self.sum_(flat))

    def split(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """The per-variable views of a flat buffer in this layout (one traced call)."""
        return list(self._split(flat))

    def sum_(self, flat: tf.Tensor) -> tf.Tensor:
        """Sum ``flat`` over the group in its own buffer; returns ``flat``, now the sum."""
        if flat.dtype != tf.float32 or tuple(flat.shape) != (self.numel,):
            raise ValueError(f"in-place gradient sum wants float32[{self.numel}], "
                             f"got {flat.dtype.name}{list(flat.shape)}")
        if "CPU" not in flat.backing_device:
            raise ValueError(f"in-place gradient sum needs a host tensor, got one on "
                             f"{flat.backing_device}")
        from mpi4py import MPI

        view = np.asarray(flat)  # no copy: the tensor's own (read-only-flagged) buffer
        address = view.__array_interface__["data"][0]
        buf = MPI.buffer.fromaddress(address, view.nbytes, readonly=False)
        group = self.group
        with watchdog.current().waiting("dp gradient allreduce (in place, MPI)", group.kind,
                                        group.ranks, nbytes=view.nbytes):
            group.comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        del view, buf
        return flat


def broadcast_variables(variables: Sequence[Any], group: Group, hvd: Any, root: int = 0) -> None:
    """Copy ``variables`` from ``group`` rank ``root`` to every rank of the group, in place.

    Horovod's ``root_rank`` is a global rank even within a process set (it
    maps it to the set's rank itself), so the group rank is translated here.

    Args:
        variables: Keras (or TensorFlow) variables, identical in order and
            shape on every rank.
        group: the group to broadcast over; its ``process_set`` is used.
        hvd: the ``horovod.tensorflow`` module.
        root: group rank whose values win.
    """
    if group.size == 1:
        return
    # One flat buffer, one negotiation: Horovod's grouped in-place broadcast
    # reuses one name for every variable, which it refuses when several are
    # in flight at once.
    variables = list(variables)
    flat = tf.concat([tf.reshape(tf.cast(v.value if isinstance(v, keras.Variable) else v,
                                         tf.float32), [-1]) for v in variables], axis=0)
    with watchdog.current().waiting("broadcast of the initial weights", group.kind, group.ranks):
        flat = hvd.broadcast(flat, root_rank=group.ranks[root], name=f"{group.kind}.bcast",
                             process_set=group.process_set)
    sizes = [int(np.prod(v.shape)) for v in variables]
    for v, part in zip(variables, tf.split(flat, sizes)):
        v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))
