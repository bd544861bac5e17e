"""From this rank's gradients to an applied optimizer step (TensorFlow).

:class:`GradientUpdate` mirrors :class:`hvdllm.torch.update.GradientUpdate`:
it owns everything between the loss and the new weights that does not
depend on how the forward pass is laid out.

1. ``loss_scale``: the engine multiplies the loss by it before taking
   gradients (fp16; 1.0 otherwise).  The Keras dtype policy of
   ``train.precision`` (:func:`hvdllm.tensorflow.precision.precision_policy`)
   is set by the engine before it builds the model.
2. ``reduce(grads)``: the data-parallel average, by
   * one in-place MPI sum of the flat gradient buffer (``compression =
     "none"``, :class:`hvdllm.tensorflow.data_parallel.InPlaceSum`); the
     engine passes the gradients already flat when :attr:`in_place` is
     set, and the 1/dp of the average is folded into the unscaling of 3;
   * Horovod's Adasum per gradient in a traced graph (``reduce_op =
     "adasum"``, :func:`hvdllm.tensorflow.data_parallel.allreduce_gradients`);
   * a compressor (``fp16``, ``bf16``, ``topk``, ``powersgd``,
     :mod:`hvdllm.tensorflow.compression`);
   * nothing for ZeRO-1 (``train.zero = 1``): its optimizer
     reduce-scatters the gradients itself.
3. ``apply(grads, lr)``: unscale and check for overflow (the flag agreed by
   all ranks, so everyone skips the same steps), clip the global norm over
   dp x tp x pp (``train.grad_clip``), step, update the loss scale.

Between 2 and 3 the engine runs reductions of its own layout (sequence-
parallel norms over TP, tied embeddings over PP).  Both calls are eager
code that runs small traced graphs; every wait on other ranks is a
registered wait of the hang watchdog.

:func:`build_optimizer` gives the ``train.optimizer``: Keras AdamW, or
:class:`TorchSGD` (``torch.optim.SGD``'s momentum and L2 decay).

State a checkpoint needs, besides the variables: ``optimizer`` (the Keras
optimizer's slots and ``iterations``, or under ZeRO-1
:meth:`~hvdllm.tensorflow.zero.ZeroAdamW.state_tensors`),
``precision.loss_scale`` (fp16: ``state_dict()``) and ``compressor``
(``state_dict()``: error feedback and PowerSGD's ``Q``, rank-private).
"""
from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from ..common import link_throttle, watchdog
from ..common.compression import wire_bytes
from ..common.config import Config
from ..common.grad_update import StepInfo
from ..common.topology import ParallelGroups
from .clip import clip_coefficient, combine_squared_norms, squared_norm_parts
from .compression import GradientCompressor, make_compressor
from .data_parallel import InPlaceSum, TracedFunction, allreduce_gradients, flatten_gradients
from .precision import MixedPrecision
from .zero import ZeroAdamW, zero_optimizer_from


class TorchSGD(keras.optimizers.Optimizer):
    """SGD with momentum and L2 weight decay, as ``torch.optim.SGD`` computes them.

    Per step: ``g = grad + weight_decay * w`` (on the variables not
    excluded from weight decay); ``buf = momentum * buf + g``; ``w -= lr *
    buf``.  Keras's own SGD differs: its momentum buffer carries the
    learning rate, and its weight decay is decoupled.  The buffer slots are
    named ``<variable>_momentum``.

    Args:
        learning_rate: step size.
        momentum: momentum factor in [0, 1).
        l2_weight_decay: L2 penalty added to the gradient.
        name: optimizer name.
    """

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0,
                 l2_weight_decay: float = 0.0, name: str = "torch_sgd", **kwargs: Any):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.l2_weight_decay = float(l2_weight_decay)

    def build(self, variables: Sequence[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums = ([self.add_variable_from_reference(v, "momentum") for v in variables]
                          if self.momentum else [])

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = tf.cast(learning_rate, variable.dtype)
        g = tf.cast(gradient, variable.dtype)
        if self.l2_weight_decay and self._use_weight_decay(variable):
            g = g + self.l2_weight_decay * variable
        if self.momentum:
            buf = self.momentums[self._get_variable_index(variable)]
            self.assign(buf, buf * self.momentum + g)
            g = buf
        self.assign_sub(variable, lr * g)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(momentum=self.momentum, l2_weight_decay=self.l2_weight_decay)
        return config


def build_optimizer(variables: Sequence[Any], cfg: Config) -> keras.optimizers.Optimizer:
    """``train.optimizer``: Keras AdamW (decoupled decay) or :class:`TorchSGD` (L2 decay).

    Weight decay applies to matrices only (variables of two or more
    dimensions, embeddings included; not biases or norms).  The optimizer
    is built on ``variables``, so its slots exist before a step is traced.
    """
    t = cfg.train
    variables = list(variables)
    if t.optimizer == "sgd":
        optimizer = TorchSGD(learning_rate=t.lr, momentum=t.momentum,
                             l2_weight_decay=t.weight_decay)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=t.lr, weight_decay=t.weight_decay,
                                           beta_1=t.beta1, beta_2=t.beta2, epsilon=t.eps)
    optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) < 2])
    optimizer.build(variables)
    return optimizer


class GradientUpdate:
    """Loss scaling, DP gradient averaging, clipping and the optimizer step.

    Args:
        variables: this rank's trainable variables (possibly TP shards or
            one pipeline stage's), in the order gradients are passed.
        optimizer: a built Keras optimizer over ``variables``
            (:func:`build_optimizer`); replaced by :class:`ZeroAdamW` when
            ``train.zero = 1`` (its own slots then stay unused).
        cfg: the run's config.
        groups: this rank's groups.
        hvd: the ``horovod.tensorflow`` module.
    """

    def __init__(self, variables: Sequence[Any], optimizer: Any, cfg: Config,
                 groups: ParallelGroups, hvd: Any):
        t = cfg.train
        self.variables = list(variables)
        self.groups = groups
        self.hvd = hvd
        self.grad_clip = float(t.grad_clip)
        self.precision = MixedPrecision(t.precision, groups.world)
        self.names = [v.path for v in self.variables]
        self.compressor: GradientCompressor | None = None
        if t.zero:
            self.optimizer = zero_optimizer_from(optimizer, self.variables, groups.dp, hvd)
        else:
            self.optimizer = optimizer
            if t.compression != "none":
                self.compressor = make_compressor(t.compression, groups.dp, hvd,
                                                  topk_ratio=t.topk_ratio,
                                                  powersgd_rank=t.powersgd_rank, seed=t.seed,
                                                  warmup_steps=t.compression_warmup_steps)
        # ZeRO's reduce-scatter plus allgather move what one allreduce moves.
        self._dense_bytes = sum(wire_bytes("none", v.shape, groups.dp.size)
                                for v in self.variables)
        self.reduce_op = t.reduce_op
        # The dense average: an in-place sum whose 1/dp is applied with the unscaling
        # in apply (a multiply the step does anyway).  A single variable's gradient
        # could be a buffer the graph shares, so that rare case takes Horovod's path,
        # as do gradients in GPU memory (MPI sums host memory here).
        self.in_place = (not self.zero and self.compressor is None and groups.dp.size > 1
                         and self.reduce_op == "average" and len(self.variables) > 1
                         and not tf.config.list_logical_devices("GPU"))
        self._grad_factor = 1.0 / groups.dp.size if self.in_place else 1.0
        self._in_place_sum = (InPlaceSum([v.shape for v in self.variables], groups.dp)
                              if self.in_place else None)
        self._flatten = TracedFunction(flatten_gradients)
        self._allreduce = TracedFunction(self._allreduce_graph)
        self._finite = TracedFunction(self._finite_graph)
        self._finite_flat = TracedFunction(self._finite_graph)  # traced once per signature
        self._norm_parts = TracedFunction(self._norm_parts_graph)
        self._step = TracedFunction(self._step_graph)
        self._step_flat = TracedFunction(self._step_flat_graph)
        self._norm_parts_flat = TracedFunction(self._norm_parts_flat_graph)

    @property
    def loss_scale(self) -> float:
        """What the engine multiplies the loss by before taking gradients (1.0 unless fp16)."""
        return self.precision.scale

    @property
    def zero(self) -> bool:
        """Whether ZeRO-1 owns the optimizer step."""
        return isinstance(self.optimizer, ZeroAdamW)

    # -- graphs ---------------------------------------------------------------
    def _allreduce_graph(self, grads: list) -> list:
        return allreduce_gradients(grads, self.groups.dp, self.hvd, op=self.reduce_op)

    def _finite_graph(self, grads: list) -> tf.Tensor:
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])

    def _norm_parts_graph(self, grads: list) -> tf.Tensor:
        return squared_norm_parts(grads, self.variables)

    def _step_graph(self, grads: list, lr: tf.Tensor, coef: tf.Tensor) -> None:
        self.optimizer.learning_rate.assign(lr)
        self.optimizer.apply([g * coef for g in grads], self.variables)

    def _step_flat_graph(self, flat: tf.Tensor, lr: tf.Tensor, coef: tf.Tensor) -> None:
        self._step_graph(self._in_place_sum.split_graph(flat), lr, coef)

    def _norm_parts_flat_graph(self, flat: tf.Tensor) -> tf.Tensor:
        return squared_norm_parts(self._in_place_sum.split_graph(flat), self.variables)

    def _dense(self, grads: Sequence[Any]) -> list[tf.Tensor]:
        if len(grads) != len(self.variables):
            raise ValueError(f"{len(grads)} gradients for {len(self.variables)} variables")
        # A variable the loss did not reach gets a zero gradient, as torch's compressors do.
        return [tf.zeros(v.shape, tf.float32) if g is None else tf.convert_to_tensor(g, tf.float32)
                for g, v in zip(grads, self.variables)]

    # -- after the gradients ----------------------------------------------
    def reduce(self, grads: Sequence[Any] | tf.Tensor) -> list[tf.Tensor]:
        """The gradients reduced over the DP group (ZeRO-1: unchanged, it reduces in apply).

        With :attr:`in_place` the result is the sum over the group (apply
        divides by dp); otherwise the average (or Adasum).

        Args:
            grads: this rank's gradients, one per variable (None: zeros);
                with :attr:`in_place` also one flat float32 tensor of them
                all (:func:`~hvdllm.tensorflow.data_parallel.flatten_gradients`),
                a fresh output of the gradient graph that this call
                overwrites with the sum and returns: :meth:`apply` takes it
                as it is.
        """
        if self.in_place:
            start = link_throttle.clock()  # HVDLLM_SIM_LINK_GBPS: a simulated slow link
            if isinstance(grads, tf.Tensor):  # flat in, flat out: apply cuts it in its graph
                grads = self._in_place_sum.sum_(grads)
            else:
                grads = self._in_place_sum(self._flatten(self._dense(grads)))
            link_throttle.settle(start, self._dense_bytes)
            return grads
        if isinstance(grads, tf.Tensor):
            raise ValueError("flat gradients are only taken by the in-place DP sum")
        grads = self._dense(grads)
        dp = self.groups.dp
        if self.zero or dp.size == 1 and self.compressor is None:
            return grads
        start = link_throttle.clock()  # HVDLLM_SIM_LINK_GBPS: a simulated slow link
        if self.compressor is not None:
            grads = self.compressor.reduce(grads, self.names)
            link_throttle.settle(start, self.compressor.last_step_bytes)
            return grads
        with watchdog.current().waiting("dp gradient allreduce (TensorFlow graph)", dp.kind,
                                        dp.ranks, nbytes=4 * sum(int(g.shape.num_elements())
                                                                 for g in grads)):
            grads = list(self._allreduce(grads))
        link_throttle.settle(start, self._dense_bytes)
        return grads

    def apply(self, grads: Sequence[Any], lr: float) -> StepInfo:
        """Unscale, check overflow on all ranks, clip, step and update the loss scale.

        Args:
            grads: the output of :meth:`reduce` (after the engine's own
                layout reductions), scaled by :attr:`loss_scale`: a list, or
                with :attr:`in_place` the flat summed buffer, which the
                optimizer graph cuts into per-variable views itself.
            lr: this step's learning rate.
        """
        flat = isinstance(grads, tf.Tensor)
        if flat and not self.in_place:
            raise ValueError("flat gradients are only taken by the in-place DP sum")
        grads = [grads] if flat else self._dense(grads)
        scale = self.precision.scale
        found_inf = False
        if self.precision.loss_scale is not None:
            finite = (self._finite_flat if flat else self._finite)(grads)
            found_inf = self.precision.found_inf(not bool(finite))
        info = StepInfo(applied=not found_inf)
        if not found_inf:
            inv = self._grad_factor / scale  # the in-place sum's 1/dp comes in here
            if self.zero:
                info.grad_norm = self._apply_zero(grads, lr, inv)
            else:
                coef = inv
                if self.grad_clip > 0:
                    parts = self._norm_parts_flat(grads[0]) if flat else self._norm_parts(grads)
                    sharded, replicated = (float(x) * inv * inv for x in parts.numpy())
                    norm = combine_squared_norms(sharded, replicated, self.groups.tp,
                                                 self.groups.pp) ** 0.5
                    coef = inv * clip_coefficient(norm, self.grad_clip)
                    info.grad_norm = norm
                lr_t, coef_t = tf.constant(lr, tf.float32), tf.constant(coef, tf.float32)
                if flat:
                    self._step_flat(grads[0], lr_t, coef_t)
                else:
                    self._step(grads, lr_t, coef_t)
        if found_inf and self.compressor is not None:
            self.compressor.forget_nonfinite()  # the overflow must not live on in its state
        self.precision.update(found_inf)
        if self.precision.loss_scale is not None:
            info.loss_scale = self.precision.scale
        info.comm_bytes = (self.compressor.last_step_bytes if self.compressor is not None
                           else self._dense_bytes)
        return info

    def _apply_zero(self, grads: list[tf.Tensor], lr: float, inv: float) -> float | None:
        opt = self.optimizer
        opt.learning_rate.assign(lr)
        opt.reduce_gradients(grads, multiplier=inv)
        norm = None
        if self.grad_clip > 0:
            norm = opt.clip_grad_norm(self.grad_clip, self.groups.tp, self.groups.pp)
        opt.step()
        return norm
