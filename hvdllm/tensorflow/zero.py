"""ZeRO stage 1 for TensorFlow: Keras AdamW whose state is sharded over the DP group.

The design of :mod:`hvdllm.torch.zero` on the partition of
:mod:`hvdllm.common.zero`.  Every rank keeps the full model (variables and
gradients) but only its ``1/dp`` shard of the optimizer: fp32 master
weights and the two Adam moments of the elements in its shard of the flat
layout.  One step:

1. the local gradients are laid into one flat fp32 buffer (padded to a
   multiple of dp) and **reduce-scattered** (average) over the DP process
   set, so each rank receives the averaged gradient of its shard only;
2. (optionally) :meth:`ZeroAdamW.clip_grad_norm` computes the global
   gradient norm from the shards and sets the clipping coefficient;
3. AdamW updates the master shard with the math of
   ``keras.optimizers.AdamW`` (decoupled weight decay ``w -= w * wd * lr``
   first, on the variables the Keras optimizer decays; then Adam with
   Keras's bias correction, ``eps`` added to ``sqrt(v)``);
4. the updated shards are **allgathered** and assigned to the variables.

Each phase is a traced ``tf.function``; the two collectives are registered
waits of the hang watchdog.  The same bytes travel as in a plain allreduce,
but optimizer memory per rank falls to about ``1/dp``.

How the engine uses it (``train.zero = 1``): build the usual Keras AdamW,
then ``optimizer = zero_optimizer_from(optimizer, variables, groups.dp,
hvd)`` (:class:`hvdllm.tensorflow.update.GradientUpdate` does this).  Per
step: ``reduce_gradients(grads)``, optionally ``clip_grad_norm(...)``, then
``step()``; ``learning_rate.assign(lr)`` as with a Keras optimizer.

Checkpoints: :meth:`ZeroAdamW.state_tensors` gives this rank's moments as
pieces of flattened variables (no communication), the form torch's ZeRO
checkpoints use; :meth:`ZeroAdamW.gather_state_tensors` gives full-shape
moments per variable (collective); :meth:`ZeroAdamW.load_state_tensors`
takes either.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from ..common import watchdog
from ..common.comm import Group
from ..common.errors import ConfigError
from ..common.zero import build_flat_layout, check_zero_optimizer
from .clip import combine_squared_norms, is_pp_duplicate, is_tp_sharded
from .data_parallel import TracedFunction

__all__ = ["ZeroAdamW", "zero_optimizer_from", "check_zero_optimizer"]

MOMENTS = ("exp_avg", "exp_avg_sq")


class ZeroAdamW:
    """Keras AdamW with master weights and moments sharded over ``group``.

    Args:
        variables: the trainable variables, identical (same shapes, same
            order) on every rank of ``group``.
        group: the data-parallel group; its ``process_set`` carries the traffic.
        hvd: the ``horovod.tensorflow`` module (unused when the group has one rank).
        learning_rate, beta_1, beta_2, epsilon, weight_decay: as
            ``keras.optimizers.AdamW``.
        decay: per variable, whether weight decay applies; default: variables
            with two or more dimensions (matrices, embeddings).
    """

    def __init__(self, variables: Sequence[Any], group: Group, hvd: Any,
                 learning_rate: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, weight_decay: float = 0.004,
                 decay: Sequence[bool] | None = None):
        self.variables = list(variables)
        self.group = group
        self.hvd = hvd
        self.beta_1, self.beta_2 = float(beta_1), float(beta_2)
        self.epsilon = float(epsilon)
        self.weight_decay = float(weight_decay or 0.0)
        self.decay = ([len(v.shape) >= 2 for v in self.variables] if decay is None
                      else [bool(d) for d in decay])
        if len(self.decay) != len(self.variables):
            raise ValueError("decay needs one flag per variable")
        self.numels = [int(np.prod(v.shape)) for v in self.variables]
        self.layout = build_flat_layout(self.numels, group.size)
        self._shard_start, self._shard_end = self.layout.shard_range(group.rank)
        self.learning_rate = tf.Variable(float(learning_rate), dtype=tf.float32, trainable=False,
                                         name="zero_learning_rate")
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="zero_iterations")
        shard = self.layout.shard_size
        self.master = tf.Variable(self._flat_params()[self._shard_start:self._shard_end],
                                  trainable=False, name="zero_master")
        self.exp_avg = tf.Variable(tf.zeros([shard]), trainable=False, name="zero_exp_avg")
        self.exp_avg_sq = tf.Variable(tf.zeros([shard]), trainable=False, name="zero_exp_avg_sq")
        # Per element of the shard: decayed?  tp-sharded?  counted in the norm at all?
        decay_mask = np.zeros(shard, bool)
        sharded_mask = np.zeros(shard, bool)
        counted_mask = np.zeros(shard, bool)
        for piece in self.pieces():
            at = slice(piece.shard_start, piece.shard_start + piece.numel)
            v = self.variables[piece.index]
            decay_mask[at] = self.decay[piece.index]
            sharded_mask[at] = is_tp_sharded(v)
            counted_mask[at] = not is_pp_duplicate(v)
        self._decay_mask = tf.constant(decay_mask)
        self._sharded_mask = tf.constant(sharded_mask & counted_mask)
        self._replicated_mask = tf.constant(~sharded_mask & counted_mask)
        self._grad_shard: tf.Tensor | None = None
        self._coef = 1.0
        self._reduce_fn = TracedFunction(self._reduce_graph)
        self._sums_fn = TracedFunction(self._sums_graph)
        self._update_fn = TracedFunction(self._update_graph)
        self._gather_fn = TracedFunction(self._gather_graph)

    # -- flat buffers ------------------------------------------------------
    @property
    def shard_range(self) -> tuple[int, int]:
        """``[start, end)`` of this rank's shard in the flat buffer."""
        return self._shard_start, self._shard_end

    @property
    def steps(self) -> int:
        """Optimizer steps taken (the bias-correction step count)."""
        return int(self.iterations.numpy())

    def pieces(self) -> list:
        """The variables (and their flat slices) in this rank's shard, in order."""
        return self.layout.shard_slices(self.group.rank)

    def flat_params(self) -> tf.Tensor:
        """Every variable laid end to end (fp32, padded), as the layout places them."""
        return self._flat_params()

    def _flat_params(self) -> tf.Tensor:
        parts = [tf.reshape(tf.cast(v, tf.float32), [-1]) for v in self.variables]
        flat = tf.concat(parts, axis=0) if parts else tf.zeros([0])
        return tf.pad(flat, [[0, self.layout.padded - self.layout.total]])

    def _waiting(self, op: str, nbytes: int) -> Any:
        return watchdog.current().waiting(op, self.group.kind, self.group.ranks, nbytes=nbytes)

    # -- graphs ---------------------------------------------------------------
    def _reduce_graph(self, grads: list, multiplier: tf.Tensor) -> tf.Tensor:
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0) * multiplier
        flat = tf.pad(flat, [[0, self.layout.padded - self.layout.total]])
        if self.group.size == 1:
            return flat
        return self.hvd.reducescatter(flat, op=self.hvd.Average, name="hvdllm.zero.grads",
                                      process_set=self.group.process_set)

    def _sums_graph(self, shard: tf.Tensor) -> tf.Tensor:
        sq = tf.square(tf.cast(shard, tf.float64))
        zero = tf.zeros_like(sq)
        return tf.stack([tf.reduce_sum(tf.where(self._sharded_mask, sq, zero)),
                         tf.reduce_sum(tf.where(self._replicated_mask, sq, zero))])

    def _update_graph(self, shard: tf.Tensor, coef: tf.Tensor) -> None:
        grad = shard * coef
        lr = self.learning_rate
        master = self.master
        if self.weight_decay:
            wd = tf.constant(self.weight_decay, tf.float32)
            master.assign(tf.where(self._decay_mask, master - master * wd * lr, master))
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1_power = tf.pow(tf.constant(self.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.constant(self.beta_2, tf.float32), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        self.exp_avg.assign_add((grad - self.exp_avg) * (1 - self.beta_1))
        self.exp_avg_sq.assign_add((tf.square(grad) - self.exp_avg_sq) * (1 - self.beta_2))
        master.assign_sub((self.exp_avg * alpha) / (tf.sqrt(self.exp_avg_sq) + self.epsilon))
        self.iterations.assign_add(1)

    def _gather_graph(self) -> None:
        flat = self.master.value() if self.group.size == 1 else self.hvd.allgather(
            self.master.value(), name="hvdllm.zero.params", process_set=self.group.process_set)
        for v, offset, n in zip(self.variables, self.layout.offsets, self.numels):
            v.assign(tf.cast(tf.reshape(flat[offset:offset + n], v.shape), v.dtype))

    # -- the step ----------------------------------------------------------
    def reduce_gradients(self, grads: Sequence[tf.Tensor], multiplier: float = 1.0) -> tf.Tensor:
        """Reduce-scatter (average) ``grads``; returns this rank's fp32 gradient shard.

        Args:
            grads: this rank's dense gradients, one per variable.
            multiplier: applied to every gradient first (the fp16 unscale).
        """
        grads = [tf.convert_to_tensor(g, tf.float32) for g in grads]
        with self._waiting("ZeRO-1 reduce-scatter of gradients", self.layout.padded * 4):
            self._grad_shard = self._reduce_fn(grads, tf.constant(multiplier, tf.float32))
        self._coef = 1.0
        return self._grad_shard

    def clip_grad_norm(self, max_norm: float, tp_group: Group | None = None,
                       pp_group: Group | None = None) -> float:
        """Clip the averaged gradient shard so the global norm is at most ``max_norm``.

        The norm counts every variable once over dp x tp x pp, as
        :func:`hvdllm.tensorflow.clip.global_grad_norm` does; returns it.
        Call after :meth:`reduce_gradients`; the scaling happens in :meth:`step`.

        Args:
            max_norm: largest allowed global L2 norm.
            tp_group: tensor-parallel group.
            pp_group: pipeline-parallel group.
        """
        if self._grad_shard is None:
            raise RuntimeError("clip_grad_norm needs reduce_gradients first")
        sums = self._sums_fn(self._grad_shard).numpy()
        if self.group.size > 1:
            sums = self.group.allreduce(sums.astype(np.float64), "sum")
        total = float(np.sqrt(combine_squared_norms(float(sums[0]), float(sums[1]), tp_group,
                                                    pp_group)))
        self._coef = min(1.0, max_norm / (total + 1e-6))
        return total

    def step(self, grads: Sequence[tf.Tensor] | None = None) -> None:
        """Reduce-scatter ``grads`` (unless done), update the shard, allgather the variables."""
        if self._grad_shard is None:
            if grads is None:
                raise RuntimeError("step needs gradients or reduce_gradients first")
            self.reduce_gradients(grads)
        self._update_fn(self._grad_shard, tf.constant(self._coef, tf.float32))
        self._grad_shard, self._coef = None, 1.0
        self._gather_params()

    def _gather_params(self) -> None:
        with self._waiting("ZeRO-1 allgather of parameters", self.layout.shard_size * 4):
            self._gather_fn()

    # -- accounting and checkpoints -----------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 master shard and both moments."""
        return 3 * 4 * self.layout.shard_size

    def state_tensors(self) -> dict[str, Any]:
        """This rank's moments, as pieces of flattened variables (no communication).

        Returns ``{"steps": int, "dp": int, "dp_rank": int, "pieces": [...]}``
        where each piece is ``{"index": i, "flat": (start, end), "exp_avg":
        array, "exp_avg_sq": array}``: elements ``[start, end)`` of
        ``variables[i]`` flattened (row-major, the variable's own shape and
        orientation), 1-D float32.  Together the DP ranks' pieces cover
        every variable exactly once.
        """
        moments = {kind: getattr(self, kind).numpy() for kind in MOMENTS}
        pieces = []
        for piece in self.pieces():
            at = slice(piece.shard_start, piece.shard_start + piece.numel)
            pieces.append({"index": piece.index, "flat": (piece.param_start, piece.param_end),
                           **{kind: moments[kind][at].copy() for kind in MOMENTS}})
        return {"steps": self.steps, "dp": self.group.size, "dp_rank": self.group.rank,
                "pieces": pieces}

    def gather_state_tensors(self) -> dict[str, Any]:
        """Full-shape moments of every variable (collective over the DP group).

        Returns ``{"steps": int, "exp_avg": [array per variable],
        "exp_avg_sq": [...]}``, each array of its variable's shape, float32.
        """
        out: dict[str, Any] = {"steps": self.steps}
        for kind in MOMENTS:
            shard = getattr(self, kind).numpy()
            flat = shard if self.group.size == 1 else self.group.allgather(shard).reshape(-1)
            out[kind] = [flat[o:o + n].reshape(tuple(v.shape)).copy()
                         for v, o, n in zip(self.variables, self.layout.offsets, self.numels)]
        return out

    def load_state_tensors(self, state: dict[str, Any]) -> None:
        """Restore moments and the step count; the master shard is re-read from the variables.

        Restore the variables first.  ``state`` is either form:

        * full (from :meth:`gather_state_tensors`, or a checkpoint
          consolidated to full tensors; any dp): ``{"steps", "exp_avg":
          [array per variable], "exp_avg_sq": [...]}``;
        * pieces (from :meth:`state_tensors` of the same DP rank at the same
          dp): ``{"steps", "dp", "dp_rank", "pieces": [...]}``.
        """
        shard = self.layout.shard_size
        lo, hi = self.shard_range
        if "pieces" in state:
            have = (self.group.size, self.group.rank)
            saved = (int(state["dp"]), int(state["dp_rank"]))
            want = [(p.index, (p.param_start, p.param_end)) for p in self.pieces()]
            got = [(int(p["index"]), tuple(int(x) for x in p["flat"])) for p in state["pieces"]]
            if have != saved or want != got:
                raise ConfigError(f"ZeRO-1 state pieces were saved for (dp, dp rank) = {saved} "
                                  f"and do not match this rank's shard at {have}")
            for kind in MOMENTS:
                values = np.zeros(shard, np.float32)
                for p, src in zip(self.pieces(), state["pieces"]):
                    values[p.shard_start:p.shard_start + p.numel] = np.asarray(
                        src[kind], np.float32).reshape(-1)
                getattr(self, kind).assign(values)
        else:
            for kind in MOMENTS:
                arrays = state[kind]
                if len(arrays) != len(self.variables):
                    raise ConfigError(f"ZeRO-1 state has {len(arrays)} {kind} tensors for "
                                      f"{len(self.variables)} variables")
                flat = np.zeros(self.layout.padded, np.float32)
                for v, a, o, n in zip(self.variables, arrays, self.layout.offsets, self.numels):
                    a = np.asarray(a, np.float32)
                    if tuple(a.shape) != tuple(v.shape):
                        raise ConfigError(f"ZeRO-1 state: {kind} of {v.path} has shape "
                                          f"{tuple(a.shape)}, the variable {tuple(v.shape)}")
                    flat[o:o + n] = a.reshape(-1)
                getattr(self, kind).assign(flat[lo:hi])
        self.iterations.assign(int(state["steps"]))
        self.master.assign(self._flat_params()[lo:hi])


def zero_optimizer_from(optimizer: Any, variables: Sequence[Any], group: Group,
                        hvd: Any) -> ZeroAdamW:
    """A :class:`ZeroAdamW` with a Keras AdamW's (or Adam's) hyper-parameters.

    Weight decay applies to the variables the Keras optimizer decays (its
    ``exclude_from_weight_decay`` settings).

    Args:
        optimizer: a ``keras.optimizers.AdamW`` or ``Adam`` that has taken no
            step; anything else is a :class:`ConfigError`.
        variables: the trainable variables it updates.
        group: the data-parallel group.
        hvd: the ``horovod.tensorflow`` module.
    """
    import keras

    if not isinstance(optimizer, keras.optimizers.Adam):  # AdamW is an Adam
        raise ConfigError(f"ZeRO-1 shards the state of keras.optimizers.AdamW and Adam only, "
                          f"not {type(optimizer).__name__}")
    for flag in ("amsgrad", "use_ema"):
        if getattr(optimizer, flag, False):
            raise ConfigError(f"ZeRO-1 does not support {type(optimizer).__name__}({flag}=True)")
    for clip in ("clipnorm", "clipvalue", "global_clipnorm", "gradient_accumulation_steps"):
        if getattr(optimizer, clip, None):
            raise ConfigError(f"ZeRO-1 does not support {type(optimizer).__name__}({clip}=...); "
                              f"use train.grad_clip")
    if int(optimizer.iterations.numpy()) != 0:
        raise ConfigError("ZeRO-1 must take over an optimizer before its first step (its "
                          "state would be lost)")
    wd = float(optimizer.weight_decay or 0.0)
    decay = [wd > 0 and optimizer._use_weight_decay(v) for v in variables]
    return ZeroAdamW(variables, group, hvd, learning_rate=float(optimizer.learning_rate.numpy()),
                     beta_1=float(optimizer.beta_1), beta_2=float(optimizer.beta_2),
                     epsilon=float(optimizer.epsilon), weight_decay=wd, decay=decay)
