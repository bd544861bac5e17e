"""Data-parallel gradient averaging and parameter broadcast over Horovod.

The TensorFlow engine sums the gradients of all micro-batches locally in
one ``tf.function`` first, and only then :func:`allreduce_gradients` runs one
Horovod allreduce (average over the DP process set) in the graph that
applies them, on all gradients packed into one flat buffer.
Accumulation therefore costs no traffic, and the step pays for a single
Horovod negotiation rather than one per tensor.

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


def allreduce_gradients(grads: Sequence[tf.Tensor], group: Group, hvd: Any) -> list[tf.Tensor]:
    """Average ``grads`` over ``group``; identity for a group of one.

    Call it inside the ``tf.function`` of the training step, so the
    allreduce is part of the step's graph.  Every rank of the group must
    pass tensors of the same shapes in the same order.

    Args:
        grads: dense gradients, one per trainable variable.
        group: the data-parallel group; its ``process_set`` is used.
        hvd: the ``horovod.tensorflow`` module.
    """
    if group.size == 1:
        return list(grads)
    grads = list(grads)
    flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    flat = hvd.allreduce(flat, op=hvd.Average, name=f"{group.kind}.grads",
                         process_set=group.process_set)
    sizes = [int(np.prod(g.shape)) for g in grads]
    return [tf.reshape(part, g.shape) for part, g in zip(tf.split(flat, sizes), grads)]


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
