"""Drop-in replacement for ``horovod.tensorflow.keras``, working on Keras 3::

    import hvdllm.tensorflow.keras as hvd   # instead of: import horovod.tensorflow.keras as hvd

* :func:`DistributedOptimizer` wraps a Keras 3 optimizer so that
  ``model.compile(optimizer=...)`` plus ``model.fit(...)`` averages the
  gradients over the ranks.  Keras 3's TensorFlow trainer hands its gradients
  straight to ``optimizer.apply_gradients`` -> ``optimizer.apply``, so the
  reduction lives there (Horovod's wrapper hooks ``get_gradients``, which
  Keras 3 never calls, and fails on Keras 3 variables).
  ``backward_passes_per_step=N`` accumulates N passes locally and
  communicates once, on the N-th.
* :mod:`hvdllm.tensorflow.keras.callbacks`: Horovod's callbacks on Keras 3
  (``optimizer.learning_rate``; no ``keras.backend.get_value``).
* ``allreduce``, ``allgather``, ``broadcast`` and ``reducescatter`` take
  numbers, numpy arrays or tensors and return numpy arrays, as Horovod's
  Keras functions do; :func:`load_model` reloads a model with its optimizer
  made distributed.
* Everything else (``init``, ``rank``, ``size``, ``Compression``,
  process sets, ...) is :mod:`hvdllm.tensorflow`'s, including its one-line
  errors before ``init()`` and its hang watchdog.
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .. import hvd_compat as _compat
from ..hvd_compat import (Average, Compression, GradientReducer, Sum, UnsupportedError,
                          global_process_set)
from . import callbacks  # noqa: F401  (hvd.callbacks.*)

__all__ = ["DistributedOptimizer", "allgather", "allreduce", "broadcast",
           "broadcast_global_variables", "callbacks", "load_model", "reducescatter"]

# horovod.tensorflow.keras's other public names, served by hvdllm.tensorflow.
_FROM_TF = frozenset("""
    init shutdown is_initialized size local_size cross_size rank local_rank cross_rank
    mpi_threads_supported mpi_enabled mpi_built gloo_enabled gloo_built nccl_built ddl_built
    ccl_built cuda_built rocm_built start_timeline stop_timeline ProcessSet add_process_set
    remove_process_set Adasum join barrier
""".split())


def __getattr__(name: str) -> Any:
    if name in _FROM_TF:
        return getattr(_compat, name)
    if name == "is_version_greater_equal_than":
        from horovod.tensorflow.keras import is_version_greater_equal_than

        return is_version_greater_equal_than
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_TF)


# -- DistributedOptimizer ------------------------------------------------------

class _DistributedOptimizerMixin:
    """Mixed into a Keras 3 optimizer's class: ``apply`` reduces the gradients first.

    With ``backward_passes_per_step > 1`` the optimizer keeps one
    accumulator per trainable variable and a pass counter (optimizer
    variables, so checkpoints and ``broadcast_variables`` carry them); each
    ``apply`` adds its gradients, and only the N-th reduces and steps.
    Inside a traced train step the two cases are the branches of one
    ``tf.cond``, and the collectives live in the N-th pass's branch only.
    """

    _hvdllm_reducer: GradientReducer
    _hvdllm_passes: int
    _hvdllm_average_passes: bool

    def build(self, variables: Any) -> None:
        super().build(variables)
        if self._hvdllm_passes > 1:
            self._hvdllm_accumulators = [
                self.add_variable_from_reference(v, name="hvdllm_accumulator")
                for v in variables]
            self._hvdllm_pass = self.add_variable(shape=(), dtype="int64",
                                                  name="hvdllm_pass_count")

    def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                return super().apply(grads, trainable_variables)  # Keras's own error
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
        if self._hvdllm_passes == 1:
            return super().apply(self._hvdllm_reducer.reduce(variables, grads), variables)
        return self._hvdllm_accumulate(grads, variables)

    def _hvdllm_accumulate(self, grads: list[Any], variables: list[Any]) -> Any:
        accumulators = [self._hvdllm_accumulators[self._get_variable_index(v)] for v in variables]
        for acc, g in zip(accumulators, grads):
            if g is not None:
                acc.assign_add(tf.cast(tf.convert_to_tensor(g), acc.dtype))
        self._hvdllm_pass.assign_add(1)
        passes = self._hvdllm_passes

        def communicate_and_step() -> tf.Tensor:
            scale = 1.0 / passes if self._hvdllm_average_passes else 1.0
            summed = [None if g is None else acc.value * scale
                      for acc, g in zip(accumulators, grads)]
            super(_DistributedOptimizerMixin, self).apply(
                self._hvdllm_reducer.reduce(variables, summed), variables)
            for acc in accumulators:
                acc.assign(tf.zeros_like(acc.value))
            return tf.constant(True)

        due = tf.equal(self._hvdllm_pass.value % passes, 0)
        if tf.executing_eagerly():
            return communicate_and_step() if bool(due) else tf.constant(False)
        return tf.cond(due, communicate_and_step, lambda: tf.constant(False))


def _make_distributed(optimizer: keras.optimizers.Optimizer, reducer: GradientReducer,
                      backward_passes_per_step: int, average_aggregated_gradients: bool) -> Any:
    """Turn ``optimizer`` into its distributed subclass, in place (built state kept)."""
    if optimizer.built and backward_passes_per_step > 1:
        raise UnsupportedError("DistributedOptimizer: backward_passes_per_step > 1 needs an "
                               "optimizer not yet built (wrap it before its first step)")
    base = type(optimizer)
    # Same name and module as the original, so a saved model records the
    # plain optimizer (load_model makes it distributed again).
    cls = type(base.__name__, (_DistributedOptimizerMixin, base),
               {"__module__": base.__module__, "__qualname__": base.__qualname__})
    optimizer.__class__ = cls
    optimizer._hvdllm_reducer = reducer
    optimizer._hvdllm_passes = backward_passes_per_step
    optimizer._hvdllm_average_passes = average_aggregated_gradients
    _distributed_optimizers.append(optimizer)
    return optimizer


_distributed_optimizers: list[Any] = []


def DistributedOptimizer(optimizer: Any, name: str | None = None, device_dense: str = "",
                         device_sparse: str = "", compression: Any = Compression.none,
                         sparse_as_dense: bool = False, gradient_predivide_factor: float = 1.0,
                         op: Any = Average, backward_passes_per_step: int = 1,
                         average_aggregated_gradients: bool = False, num_groups: int = 0,
                         groups: Any = None, process_set: Any = global_process_set,
                         scale_local_gradients: bool = True) -> Any:
    """Make a Keras 3 optimizer average its gradients over the ranks.

    Horovod's arguments, in Horovod's order.  The optimizer is converted in
    place and returned (Horovod builds a copy from its config; converting in
    place keeps any built state), so ``model.compile(optimizer=...)`` and
    ``model.fit`` just work, as does ``optimizer.apply_gradients`` in a
    custom loop.

    Args:
        optimizer: a ``keras.optimizers.Optimizer`` (Keras 3), including a
            ``LossScaleOptimizer``.
        name, device_dense, device_sparse, num_groups, groups: Horovod's;
            ignored (gradients of one dtype already travel together).
        compression: ``Compression.none``/``fp16``/``bf16`` (graph and
            eager), ``topk(ratio)``/``powersgd(rank)`` (eager only:
            ``compile(run_eagerly=True)``).
        sparse_as_dense: densify ``tf.IndexedSlices`` gradients.
        gradient_predivide_factor: with Average, divide by this before the sum
            and by ``size / factor`` after it.
        op: ``Average`` (default), ``Sum`` or ``Adasum``.
        backward_passes_per_step: apply (and communicate) once every this
            many calls, on the local sum of their gradients.
        average_aggregated_gradients: divide that local sum by
            ``backward_passes_per_step`` (Horovod's default: False).
        process_set: the ranks to reduce over.
        scale_local_gradients: Horovod's option for
            ``PartialDistributedGradientTape``; kept for the signature.
    """
    _compat._require_init("DistributedOptimizer")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise UnsupportedError(f"hvd.DistributedOptimizer (hvdllm.tensorflow.keras) wraps Keras 3 "
                               f"optimizers; got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizerMixin):
        raise UnsupportedError("hvd.DistributedOptimizer: this optimizer is already distributed")
    if not (isinstance(backward_passes_per_step, int) and backward_passes_per_step >= 1):
        raise UnsupportedError(f"DistributedOptimizer: backward_passes_per_step must be an "
                               f"integer >= 1, got {backward_passes_per_step!r}")
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise UnsupportedError("DistributedOptimizer: use backward_passes_per_step, not Keras's "
                               "gradient_accumulation_steps (which would communicate every pass)")
    reducer = GradientReducer(compression, op, gradient_predivide_factor, process_set,
                              sparse_as_dense, scale_local_gradients, "DistributedOptimizer")
    return _make_distributed(optimizer, reducer, backward_passes_per_step,
                             average_aggregated_gradients)


# -- functions -------------------------------------------------------------------

def _numpy(result: Any) -> Any:
    return result.numpy() if tf.executing_eagerly() and hasattr(result, "numpy") else result


def allreduce(value: Any, name: str | None = None, average: bool | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0, op: Any = None,
              compression: Any = Compression.none,
              process_set: Any = global_process_set) -> Any:
    """Horovod's Keras ``allreduce``: ``value`` reduced over the ranks, as numpy (eager)."""
    if op is None:
        op = Average if average is None or average else Sum
    return _numpy(_compat.allreduce(tf.convert_to_tensor(value), name=name, op=op,
                                    prescale_factor=prescale_factor,
                                    postscale_factor=postscale_factor,
                                    compression=compression, process_set=process_set))


def allgather(value: Any, name: str | None = None, process_set: Any = global_process_set) -> Any:
    """Horovod's Keras ``allgather``: ``value`` concatenated over the ranks on axis 0."""
    return _numpy(_compat.allgather(tf.convert_to_tensor(value), name=name,
                                    process_set=process_set))


def broadcast(value: Any, root_rank: int, name: str | None = None,
              process_set: Any = global_process_set) -> Any:
    """Horovod's Keras ``broadcast``: ``root_rank``'s ``value`` on every rank."""
    return _numpy(_compat.broadcast(tf.convert_to_tensor(value), root_rank, name=name,
                                    process_set=process_set))


def reducescatter(value: Any, name: str | None = None, op: Any = Average,
                  process_set: Any = global_process_set) -> Any:
    """Horovod's Keras ``reducescatter``: this rank's slice of the reduced ``value``."""
    return _numpy(_compat.reducescatter(tf.convert_to_tensor(value), name=name, op=op,
                                        process_set=process_set))


def broadcast_global_variables(root_rank: int) -> None:
    """Broadcast, from ``root_rank``, every variable the distributed optimizers hold.

    Keras 3 keeps no global variable collection, so "global variables" are
    those of every :func:`DistributedOptimizer` made in this process that
    has been built: the trainable variables it updates and its own state.
    Non-trainable model variables (batch-norm statistics) are not among
    them: broadcast ``model.variables`` with
    :func:`hvdllm.tensorflow.broadcast_variables`, or use
    :class:`~hvdllm.tensorflow.keras.callbacks.BroadcastGlobalVariablesCallback`.
    """
    _compat._require_init("broadcast_global_variables")
    built = [opt for opt in _distributed_optimizers if opt.built]
    if not built:
        raise UnsupportedError("broadcast_global_variables: no built DistributedOptimizer holds "
                               "variables yet; call it after the first step, or use "
                               "BroadcastGlobalVariablesCallback / broadcast_variables")
    variables: list[Any] = []
    for opt in built:
        variables += list(opt._trainable_variables) + list(opt.variables)
    _compat.broadcast_variables(variables, root_rank)


def load_model(filepath: str, custom_optimizers: Any = None, custom_objects: Any = None,
               compression: Any = Compression.none, legacy_opts: bool = False) -> keras.Model:
    """Load a saved Keras model and make its optimizer a :func:`DistributedOptimizer`.

    Args:
        filepath: a ``.keras`` file (or anything ``keras.models.load_model`` reads).
        custom_optimizers: optimizer classes the file may name, beyond Keras's.
        custom_objects: passed to ``keras.models.load_model``.
        compression: the distributed optimizer's compression.
        legacy_opts: Horovod's; Keras 3 has no legacy optimizers (must be False).
    """
    if legacy_opts:
        raise UnsupportedError("load_model: legacy_opts=True needs Keras 2's legacy optimizers, "
                               "which Keras 3 does not have")
    objects = dict(custom_objects or {})
    for cls in custom_optimizers or []:
        objects[cls.__name__] = cls
    model = keras.models.load_model(filepath, custom_objects=objects or None)
    if getattr(model, "optimizer", None) is not None:
        DistributedOptimizer(model.optimizer, compression=compression)
    return model

