"""The TensorFlow training engine: Keras model, tensor and pipeline parallelism, optimizer, DP sync."""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common import timeline, watchdog
from ..common.config import Config, straggle
from ..common.family import family_spec
from ..common.init_from import initial_tensors
from ..common.topology import ParallelGroups
from ..common.train_checkpoint import CheckpointReader, RankState
from .data_parallel import TracedFunction, broadcast_variables, flatten_gradients
from .distributed import import_horovod
from .models import MODEL_CLASSES, CausalLM
from .pipeline import PipelineExecutor, build_pipeline, plan_split
from .precision import precision_policy
from .state import TensorFlowState, assign_logical
from .tensor_parallel import TensorParallelGroup, parallelize
from .update import GradientUpdate, build_optimizer


def build_model(cfg: Config) -> CausalLM:
    """The reference model for ``cfg.model``: from ``train.seed``, or ``model.init_from``."""
    m = cfg.model
    keras.utils.set_random_seed(cfg.train.seed)
    model = MODEL_CLASSES[m.family].from_model_config(m)
    model.build((None, m.seq_len))
    # Pipelines recompute whole chunks in their executor; without one, every block.
    object.__setattr__(model, "recompute", cfg.parallel.recompute == "full"
                       and cfg.parallel.pp == 1)
    if m.init_from:  # the full weights, as the torch engine loads them
        assign_logical(model, family_spec(m), initial_tensors(m.init_from, m),
                       f"checkpoint {m.init_from}")
    return model


class TensorFlowEngine:
    """One rank's training step: TP-sharded Keras model, pipeline stage, DP sync, optimizer.

    Built by :func:`build_engine`, in the order of the torch engine.
    Gradient accumulation: each micro-batch's loss is scaled by
    ``loss_scale / accum_steps`` and its gradients are summed in the graph
    (a graph loop, the same size for any count); the data-parallel average
    runs once, on the total, so accumulation costs no traffic.

    Without a pipeline a step is one traced graph of forward and backward
    over every micro-batch.  With tp > 1 the tensor-parallel collectives
    run inside that graph (Horovod ops on the TP process set), so the
    hang watchdog counts the whole graph call as a wait on the TP group:
    a frozen TP peer is reported after ``parallel.timeout_sec``, at the
    price that this rank's own computation inside the graph counts towards
    it too (one step of it, far below the deadline).  With pp > 1 the
    stage's executor walks the schedule, one traced graph per chunk and
    micro-batch, and its point-to-point waits are polled with deadlines.

    Without a pipeline or sequence parallelism, and with the in-place DP
    sum (:attr:`GradientUpdate.in_place`), the graph returns the gradients
    as one flat buffer that the sum overwrites.

    After the gradients: the sequence-parallel sum over TP of the
    replicated variables' gradients, the data-parallel average
    (:class:`~hvdllm.tensorflow.update.GradientUpdate`: compression or
    ZeRO-1), GPT's tied embedding summed over the first and last stages,
    then unscale, overflow check, clipping and the optimizer step.

    Args:
        cfg: the run's config.
        groups: this rank's groups.
        model: this rank's Keras model, sharded by ``parallelize``.
        tp: the tensor-parallel group.
        pipeline: the stage's executor (None without pipelining).
        update: gradient averaging, clipping and the optimizer step.
        num_params: parameters of the full model.
        log_lines: start-up log lines (the pipeline split).
    """

    def __init__(self, cfg: Config, groups: ParallelGroups, model: CausalLM,
                 tp: TensorParallelGroup, pipeline: PipelineExecutor | None,
                 update: GradientUpdate, num_params: int, log_lines: list[str]):
        self.cfg = cfg
        self.groups = groups
        self.model = model
        self.tp = tp
        self.pipeline = pipeline
        self.update = update
        self.hvd = update.hvd
        self.num_params = num_params
        self._log_lines = log_lines
        self.variables = update.variables
        self.optimizer = update.optimizer
        self._metrics: dict = {}
        self.slow_factor = 1.0  # parallel.straggler: this replica's slow-down
        # Traced once per micro-batch layout; calling the concrete graph directly
        # skips tf.function's per-call argument matching.
        self._accumulate = tf.function(self._accumulate_graph)
        self._traced: dict[tuple, tf.types.experimental.ConcreteFunction] = {}
        self._eval = tf.function(self._eval_graph)
        self._eval_traced: dict[tuple, tf.types.experimental.ConcreteFunction] = {}
        self._sp_reduce = None
        if tp.sequence_parallel:
            self._sp_reduce = TracedFunction(self._sp_reduce_graph)
        # The in-place DP sum takes the gradients as one flat buffer: the gradient
        # graph writes them so, and no separate packing pass runs.
        self._flat_grads = update.in_place and pipeline is None and self._sp_reduce is None
        self.state = TensorFlowState(model, self.variables, update, groups, cfg.train.optimizer,
                                     family_spec(cfg.model),
                                     extra=model.non_trainable_variables)

    def _micro_batch(self, x: tf.Tensor, y: tf.Tensor, scale: tf.Tensor) -> tuple:
        """Loss of one micro-batch and the gradients of ``loss * scale``."""
        with tf.GradientTape() as tape:
            loss = self.model.next_token_loss(x, y, training=True)
            scaled = loss * scale
        grads = tape.gradient(scaled, self.variables)
        # Embedding lookups give IndexedSlices; the sum and the allreduce want dense tensors.
        return loss, [tf.zeros(v.shape, tf.float32) if g is None else tf.convert_to_tensor(g)
                      for g, v in zip(grads, self.variables)]

    def _accumulate_graph(self, xs: tf.Tensor, ys: tf.Tensor, loss_scale: tf.Tensor) -> tuple:
        """Mean loss and summed gradients over micro-batches ``xs``, ``ys`` of shape (n, b, t)."""
        n = xs.shape[0]
        scale = loss_scale / n
        total, grads = self._micro_batch(xs[0], ys[0], scale)
        if n > 1:
            for i in tf.range(1, n):
                # One iteration at a time: running micro-batches side by side (the
                # loop's default of 10) holds all their activations at once, which
                # defeats accumulation's purpose; and with tp > 1 Horovod refuses a
                # collective whose name is still in flight from the last iteration.
                tf.autograph.experimental.set_loop_options(parallel_iterations=1)
                # The executor runs the lowered loop's ops as soon as their inputs
                # are ready: without this the next forward starts beside the last
                # backward and two micro-batches' activations are held at once.
                with tf.control_dependencies(grads):
                    x, y = tf.identity(xs[i]), tf.identity(ys[i])
                loss, more = self._micro_batch(x, y, scale)
                total += loss
                grads = [g + m for g, m in zip(grads, more)]
        if self._flat_grads:
            return total / n, flatten_gradients(grads)
        return total / n, grads

    def _sp_reduce_graph(self, grads: list) -> list:
        return self.tp.all_reduce_grads(grads, self.variables)

    def _gradients(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple:
        xs = tf.convert_to_tensor(np.stack([x for x, _ in micro_batches]))
        ys = tf.convert_to_tensor(np.stack([y for _, y in micro_batches]))
        scale = tf.constant(self.update.loss_scale, tf.float32)
        key = (tuple(xs.shape), tuple(ys.shape), xs.dtype, ys.dtype)
        graph = self._traced.get(key)
        if graph is None:
            graph = self._traced[key] = self._accumulate.get_concrete_function(xs, ys, scale)
        if self.tp.size == 1:
            loss, grads = graph(xs, ys, scale)
        else:
            tp = self.groups.tp
            with watchdog.current().waiting("tensor-parallel forward/backward (TensorFlow "
                                            "graph)", tp.kind, tp.ranks):
                loss, grads = graph(xs, ys, scale)
        return float(loss), (grads if self._flat_grads else list(grads))

    # -- parameter-server mode (hvdllm.train.ps_runner) ---------------------
    def compute_gradients(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """The step up to the optimizer, for a worker replica of its own (dp 1): the
        gradients, summed over TP where sequence parallelism needs it and over
        the tied embedding's stages, are kept for :meth:`ps_gradients`."""
        if self.groups.dp.size != 1:
            raise RuntimeError("compute_gradients is for a worker replica of dp 1")
        began = time.perf_counter()
        if self.pipeline is not None:
            loss, grads = self.pipeline.train_step(micro_batches,
                                                   loss_scale=self.update.loss_scale)
        else:
            loss, grads = self._gradients(micro_batches)
        straggle(self.slow_factor, began)
        if isinstance(grads, tf.Tensor):
            self._ps_grads = grads.numpy()
            return loss
        grads = self.update._dense(grads)
        if self._sp_reduce is not None:
            grads = list(self._sp_reduce(grads))
        if self.pipeline is not None:
            grads = self.pipeline.reduce_tied_grads(grads)
        self._ps_grads = np.concatenate([np.asarray(g, np.float32).reshape(-1) for g in grads])
        return loss

    def ps_decay_mask(self) -> np.ndarray:
        """Per float of the flat vector: weight decay applies (matrices only)."""
        return np.concatenate([np.full(int(np.prod(v.shape)), len(v.shape) >= 2, np.uint8)
                               for v in self.variables])

    def ps_get(self) -> np.ndarray:
        return np.concatenate([np.asarray(v.numpy(), np.float32).reshape(-1)
                               for v in self.variables])

    def ps_set(self, flat: np.ndarray) -> None:
        offset = 0
        for v in self.variables:
            n = int(np.prod(v.shape))
            v.assign(flat[offset:offset + n].reshape(v.shape))
            offset += n

    def ps_set_optimizer(self, steps: int, slots: dict[str, np.ndarray]) -> None:
        """Load the servers' optimizer state (flat, in :meth:`ps_get`'s order):
        ``m`` is AdamW's momentum or SGD's, ``v`` AdamW's velocity; ``steps``
        updates were applied.  Then :meth:`capture_state` saves a training
        checkpoint that a synchronous run resumes from."""
        from .state import _SLOTS, _slot

        suffixes = [suffix for _, suffix in _SLOTS[self.cfg.train.optimizer]]
        flats = [slots["m"], slots["v"]][:len(suffixes)]
        opt = self.update.optimizer
        offset = 0
        for v in self.variables:
            n = int(np.prod(v.shape))
            for suffix, flat in zip(suffixes, flats):
                _slot(opt, v, suffix).assign(flat[offset:offset + n].reshape(v.shape))
            offset += n
        opt.iterations.assign(steps)

    def ps_gradients(self) -> np.ndarray:
        return self._ps_grads

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   lr: float) -> float:
        prof = timeline.current()
        began = time.perf_counter()
        if self.pipeline is not None:
            loss, grads = self.pipeline.train_step(micro_batches,
                                                   loss_scale=self.update.loss_scale)
        else:
            # one graph runs every micro-batch's forward and backward
            with prof.span("forward+backward", micro_batches=len(micro_batches)):
                loss, grads = self._gradients(micro_batches)
        straggle(self.slow_factor, began)  # parallel.straggler, before the gradients leave
        with prof.span("grad sync"):
            if self._sp_reduce is not None:
                tp = self.groups.tp
                with watchdog.current().waiting("sequence-parallel gradient allreduce", tp.kind,
                                                tp.ranks):
                    grads = list(self._sp_reduce(grads))
            grads = self.update.reduce(grads)
            if self.pipeline is not None:
                grads = self.pipeline.reduce_tied_grads(grads)
        with prof.span("optimizer"):
            self._metrics = self.update.apply(grads, lr).as_metrics()
        return loss

    def eval_loss(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Forward-only mean loss of ``micro_batches``; dropout off, no gradients or RNG draws."""
        if self.pipeline is not None:
            return self.pipeline.eval_loss(micro_batches)
        total = 0.0
        for x, y in micro_batches:
            xt, yt = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
            key = (tuple(xt.shape), tuple(yt.shape), xt.dtype, yt.dtype)
            graph = self._eval_traced.get(key)
            if graph is None:
                graph = self._eval_traced[key] = self._eval.get_concrete_function(xt, yt)
            if self.tp.size == 1:
                loss = graph(xt, yt)
            else:
                tp = self.groups.tp
                with watchdog.current().waiting("tensor-parallel forward (TensorFlow graph)",
                                                tp.kind, tp.ranks):
                    loss = graph(xt, yt)
            total += float(loss)
        return total / len(micro_batches)

    def _eval_graph(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return self.model.next_token_loss(x, y, training=False)

    def describe(self) -> list[str]:
        return list(self._log_lines)

    def step_metrics(self) -> dict:
        return self._metrics

    def capture_state(self, state: RankState) -> None:
        self.state.capture(state)

    def restore_state(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        return self.state.restore(reader, same_layout)

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        model = self.model if self.pipeline is None else self.pipeline.language_model()
        with self.tp.sequence_parallel_off():  # generation lengths need not divide by tp
            return model.generate(prompt, max_new_tokens, seed)


def build_engine(cfg: Config, groups: ParallelGroups, threads: int) -> TensorFlowEngine:
    """The engine for ``hvdllm train``, built in the order of the torch engine.

    config -> model (under the precision policy) -> tensor parallelism
    (with sequence parallelism) -> pipeline cut -> data-parallel start ->
    optimizer.  Every rank builds the full model from ``train.seed`` (or
    ``model.init_from``) and keeps its slices of it, so any layout starts
    from the weights of one process.  TensorFlow's thread pools are sized
    first: they are fixed once any op has run.

    Args:
        cfg: the run's config.
        groups: this rank's groups.
        threads: this rank's share of the node's cores.
    """
    _set_threads(threads)
    hvd = import_horovod()
    policy = precision_policy(cfg)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy or "float32")
    try:
        model = build_model(cfg)
    finally:
        keras.config.set_dtype_policy(previous)
    num_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    split = plan_split(model, cfg, groups) if cfg.parallel.pp > 1 else None
    tp = TensorParallelGroup(groups.tp, cfg.parallel.sequence_parallel, hvd=hvd)
    parallelize(model, tp)
    pipeline, log_lines = None, []
    if split is not None:
        pipeline = build_pipeline(model, split, cfg, groups, tp)
        log_lines.append(split.describe(cfg.parallel.pp))
        variables = pipeline.variables
    else:
        variables = list(model.trainable_variables)
    broadcast_variables(variables, groups.dp, hvd)
    update = GradientUpdate(variables, build_optimizer(variables, cfg), cfg, groups, hvd)
    return TensorFlowEngine(cfg, groups, model, tp, pipeline, update, num_params, log_lines)


def _set_threads(threads: int) -> None:
    """Size TF's thread pools, unless TF already runs (then they can no longer change)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        # Two inter-op threads let an in-graph allreduce wait while compute goes on.
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError as exc:
        warnings.warn(f"TensorFlow thread pools keep their size: {exc}", stacklevel=3)
