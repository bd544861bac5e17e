"""The TensorFlow training engine: Keras GPT, AdamW and data-parallel gradient sync."""
from __future__ import annotations

import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common import watchdog
from ..common.config import Config
from ..common.family import family_spec
from ..common.init_from import initial_tensors
from ..common.topology import ParallelGroups
from ..common.train_checkpoint import CheckpointReader, RankState
from .data_parallel import allreduce_gradients, broadcast_variables
from .distributed import import_horovod
from .models import MODEL_CLASSES, CausalLM
from .state import TensorFlowState, assign_logical


def build_model(cfg: Config) -> CausalLM:
    """The reference model for ``cfg.model``: from ``train.seed``, or ``model.init_from``."""
    m = cfg.model
    keras.utils.set_random_seed(cfg.train.seed)
    model = MODEL_CLASSES[m.family].from_model_config(m)
    model.build((None, m.seq_len))
    if m.init_from:  # the full weights, as the torch engine loads them
        assign_logical(model, family_spec(m), initial_tensors(m.init_from, m),
                       f"checkpoint {m.init_from}")
    return model


def build_optimizer(model: keras.Model, cfg: Config) -> keras.optimizers.AdamW:
    """AdamW with weight decay on matrices only (embeddings included; biases and norms not)."""
    t = cfg.train
    optimizer = keras.optimizers.AdamW(learning_rate=t.lr, weight_decay=t.weight_decay,
                                       beta_1=t.beta1, beta_2=t.beta2, epsilon=t.eps)
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if len(v.shape) < 2])
    # Build now, eagerly: the slot variables must exist before the step is traced.
    optimizer.build(model.trainable_variables)
    return optimizer


class TensorFlowEngine:
    """Data-parallel GPT training step: ``tf.function`` graphs, one Horovod allreduce.

    Gradient accumulation: each micro-batch's loss is scaled by
    1/accum_steps and its gradients are summed into the running total in
    the graph; the DP allreduce runs once, on the total, after the last
    micro-batch, so accumulation costs no traffic.

    With dp = 1 a step is one graph (accumulate and apply).  With dp > 1 it
    is two: the accumulation graph, then the allreduce-and-apply graph.
    The split lets the hang watchdog tell this rank's own computation
    (never a hang, however slow) from the wait on its peers inside the
    allreduce (bounded by ``parallel.timeout_sec``).

    Args:
        cfg: the run's configuration.
        groups: this rank's groups; gradients are averaged over ``groups.dp``.
    """

    def __init__(self, cfg: Config, groups: ParallelGroups):
        self.cfg = cfg
        self.groups = groups
        self.hvd = import_horovod()
        self.model = build_model(cfg)
        self.variables = list(self.model.trainable_variables)
        broadcast_variables(self.variables, groups.dp, self.hvd)
        self.optimizer = build_optimizer(self.model, cfg)
        self.num_params = sum(int(np.prod(v.shape)) for v in self.variables)
        self._grad_bytes = 4 * self.num_params
        # Traced once per micro-batch layout; the learning rate is a tensor
        # argument so that a new value each step does not retrace.
        self._step = tf.function(self._step_graph)
        self._accumulate = tf.function(self._accumulate_graph)
        self._sync = tf.function(self._sync_graph)
        # Calling the traced graphs directly skips tf.function's per-call
        # argument matching, a fixed cost that is visible on small models.
        self._traced: dict[tuple, tf.types.experimental.ConcreteFunction] = {}
        self._traced_sync: tf.types.experimental.ConcreteFunction | None = None
        self.state = TensorFlowState(self.model, self.variables, self, groups,
                                     cfg.train.optimizer, family_spec(cfg.model),
                                     extra=self.model.non_trainable_variables)

    def _micro_batch(self, x: tf.Tensor, y: tf.Tensor, n: int) -> tuple[tf.Tensor, list]:
        """Loss of one micro-batch and the gradients of ``loss / n``."""
        with tf.GradientTape() as tape:
            loss = self.model.next_token_loss(x, y, training=True)
            scaled = loss / n
        grads = tape.gradient(scaled, self.variables)
        # Embedding lookups give IndexedSlices; the sum and the allreduce want dense tensors.
        return loss, [tf.convert_to_tensor(g) for g in grads]

    def _accumulate_graph(self, xs: tf.Tensor, ys: tf.Tensor) -> tuple[tf.Tensor, list]:
        """Mean loss and summed gradients over micro-batches ``xs``, ``ys`` of shape (n, b, t)."""
        n = xs.shape[0]
        total, grads = self._micro_batch(xs[0], ys[0], n)
        if n > 1:
            # A graph loop, not an unrolled one: the graph stays the same size for any n.
            for i in tf.range(1, n):
                loss, more = self._micro_batch(xs[i], ys[i], n)
                total += loss
                grads = [g + m for g, m in zip(grads, more)]
        return total / n, grads

    def _apply(self, grads: list, lr: tf.Tensor) -> None:
        self.optimizer.learning_rate.assign(lr)
        self.optimizer.apply(grads, self.variables)

    def _step_graph(self, xs: tf.Tensor, ys: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
        """A whole optimizer step without data parallelism (dp = 1)."""
        loss, grads = self._accumulate_graph(xs, ys)
        self._apply(grads, lr)
        return loss

    def _sync_graph(self, grads: list, lr: tf.Tensor) -> None:
        """Average the accumulated gradients over the DP group and apply them (dp > 1)."""
        self._apply(allreduce_gradients(grads, self.groups.dp, self.hvd), lr)

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   lr: float) -> float:
        xs = tf.convert_to_tensor(np.stack([x for x, _ in micro_batches]))
        ys = tf.convert_to_tensor(np.stack([y for _, y in micro_batches]))
        lr_t = tf.constant(lr, tf.float32)
        key = (tuple(xs.shape), tuple(ys.shape), xs.dtype, ys.dtype)
        dp = self.groups.dp
        graph = self._traced.get(key)
        if graph is None:
            traced = self._step if dp.size == 1 else self._accumulate
            args = (xs, ys, lr_t) if dp.size == 1 else (xs, ys)
            graph = self._traced[key] = traced.get_concrete_function(*args)
        if dp.size == 1:
            return float(graph(xs, ys, lr_t))
        loss, grads = graph(xs, ys)
        if self._traced_sync is None:
            self._traced_sync = self._sync.get_concrete_function(grads, lr_t)
        with watchdog.current().waiting("dp gradient allreduce (TensorFlow graph)", dp.kind,
                                        dp.ranks, nbytes=self._grad_bytes):
            self._traced_sync(grads, lr_t)
        return float(loss)

    def describe(self) -> list[str]:
        return []

    def step_metrics(self) -> dict:
        return {}

    def capture_state(self, state: RankState) -> None:
        self.state.capture(state)

    def restore_state(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        return self.state.restore(reader, same_layout)

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        return self.model.generate(prompt, max_new_tokens, seed)


def build_engine(cfg: Config, groups: ParallelGroups, threads: int) -> TensorFlowEngine:
    """Engine for ``hvdllm train``; ``threads`` is this rank's share of the node's cores.

    Sets TensorFlow's thread pools first: they are fixed once any op has run.
    """
    _set_threads(threads)
    return TensorFlowEngine(cfg, groups)


def _set_threads(threads: int) -> None:
    """Size TF's thread pools, unless TF already runs (then they can no longer change)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        # Two inter-op threads let an in-graph allreduce wait while compute goes on.
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError as exc:
        warnings.warn(f"TensorFlow thread pools keep their size: {exc}", stacklevel=3)
