"""Megatron-style tensor-parallel Keras layers, each built from a slice of a full weight.

Every layer here holds only this rank's shard and is made by a
``from_dense`` constructor that slices the full, identically initialised
weight of the plain layer it replaces with the family contract's
:class:`~hvdllm.common.tp_split.Split` (:func:`hvdllm.common.tp_split.shard`),
so tp=N starts from exactly the weights of tp=1.  The new layer takes the
old one's name and place, so its variables keep their paths
(``gpt/block_0/attn/qkv/kernel``); replicated variables (a row-parallel
bias, the positions) are the plain layer's own variables, reused.

A variable holding a shard carries ``hvdllm_tp_sharded = True`` and
``hvdllm_split``, the :class:`Split` of its logical tensor (torch
orientation: a Dense kernel holds its split transposed).  Untagged
variables are replicated over the TP group.

Under sequence parallelism the activations between layers are split along
the sequence (axis 1): column-parallel layers allgather their input
sequence first, row-parallel layers reduce-scatter their output, and the
vocabulary-parallel embedding reduce-scatters instead of allreducing.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from ...common.tp_split import Split, padded_rows, shard
from .mappings import (TensorParallelGroup, gather_from_region, reduce_from_region,
                       reduce_scatter_to_sequence, scatter_to_region)


def mark_sharded(variable: Any, split: Split) -> Any:
    """Tag ``variable`` as this rank's shard of a logical tensor split by ``split``."""
    variable.hvdllm_tp_sharded = True
    variable.hvdllm_split = split
    return variable


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp``."""
    return padded_rows(vocab_size, tp)


def _shard_kernel(kernel: Any, split: Split, tp: TensorParallelGroup) -> np.ndarray:
    """This rank's part of a Keras (in, out) kernel; ``split`` splits its (out, in) transpose."""
    full = np.asarray(ops.convert_to_numpy(kernel)).T
    return np.ascontiguousarray(shard(full, split, tp.rank, tp.size).T)


def _shard_rows(value: Any, split: Split, tp: TensorParallelGroup) -> np.ndarray:
    """This rank's part of a vector or row table (bias, embedding) split along axis 0."""
    full = np.asarray(ops.convert_to_numpy(value))
    return np.ascontiguousarray(shard(full, split, tp.rank, tp.size))


def _replace_build(layer: keras.layers.Layer, old: keras.layers.Layer, input_shape: tuple,
                   reuse: dict | None = None) -> None:
    """Build ``layer`` where ``old`` was built, so its variables get ``old``'s paths.

    ``reuse``: attribute name -> an existing variable the build adopts
    instead of making a new one (replicated weights).  New variables start
    at zero, for the caller to fill: no random numbers are drawn.
    """
    layer._parent_path = old._parent_path
    object.__setattr__(layer, "_reuse", dict(reuse or {}))  # untracked until build adopts it
    layer.build(input_shape)
    object.__setattr__(layer, "_reuse", None)


def _serialize(initializer: Any) -> Any:
    """An initializer identifier for ``get_config`` (an object is serialized)."""
    if isinstance(initializer, (str, dict)):
        return initializer
    return keras.initializers.serialize(initializer)


def _check_plain_dense(dense: keras.layers.Layer) -> None:
    if not isinstance(dense, keras.layers.Dense):
        raise TypeError(f"expected a keras Dense layer, got {type(dense).__name__}")
    if dense.activation not in (None, keras.activations.linear):
        raise ValueError(f"Dense layer {dense.name} has an activation; tensor-parallel "
                         f"layers split only linear maps")


class _TensorParallelLayer(keras.layers.Layer):
    """Shared bookkeeping: the TP group (not part of the config) and adopted variables."""

    def __init__(self, tp: TensorParallelGroup, **kwargs: Any):
        super().__init__(**kwargs)
        object.__setattr__(self, "tp", tp)  # a group handle, not state
        object.__setattr__(self, "_reuse", None)  # set while a from_dense build runs

    def _weight(self, attr: str, shape: tuple, initializer: Any) -> Any:
        """The variable ``attr``: the adopted one, or a new one of ``shape``."""
        if self._reuse is None:
            return self.add_weight(name=attr, shape=shape,
                                   initializer=keras.initializers.get(initializer))
        given = self._reuse.get(attr)
        if given is None:
            return self.add_weight(name=attr, shape=shape, initializer="zeros")
        if tuple(given.shape) != tuple(shape):
            raise ValueError(f"{self.name}: {attr} of shape {tuple(given.shape)} where "
                             f"{tuple(shape)} is needed")
        return given


@keras.saving.register_keras_serializable(package="hvdllm")
class ColumnParallelDense(_TensorParallelLayer):
    """y = x W + b with W split by output columns: each rank computes its columns of y.

    Args:
        units: full output width.
        tp: the tensor-parallel group (not part of ``get_config``: pass it again).
        use_bias: add a bias (split like the columns).
        parts: the full columns are this many fused blocks (3 for q, k, v),
            each split separately (:meth:`Split.shard`).
        gather_output: allgather y so every rank holds all columns; otherwise
            y stays split along its last axis (the input of a row-parallel layer).
        shared_input: the layer is one of several consecutive layers fed the
            same tensor; they share one input collective
            (:meth:`TensorParallelGroup.enter_column_region`).
        kernel_initializer, bias_initializer: for a layer not made by
            :meth:`from_dense`.
    """

    def __init__(self, units: int, tp: TensorParallelGroup, use_bias: bool = True,
                 parts: int = 1, gather_output: bool = False, shared_input: bool = False,
                 kernel_initializer: Any = "glorot_uniform", bias_initializer: Any = "zeros",
                 **kwargs: Any):
        super().__init__(tp, **kwargs)
        self.units = units
        self.use_bias = use_bias
        self.parts = parts
        self.gather_output = gather_output
        self.shared_input = shared_input
        # Identifiers, made into initializers only when used: an unseeded Keras
        # initializer draws its seed when made, and from_dense draws nothing.
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.local_units = self.split.shard_shape((units,), tp.size)[0]

    @property
    def split(self) -> Split:
        """The split of the logical weight (rows = output units)."""
        return Split.column(self.parts)

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, tp: TensorParallelGroup, parts: int = 1,
                   gather_output: bool = False, shared_input: bool = False
                   ) -> "ColumnParallelDense":
        """Slice a full, built ``Dense`` (``parts`` fused blocks of output units)."""
        _check_plain_dense(dense)
        layer = cls(dense.units, tp, use_bias=dense.use_bias, parts=parts,
                    gather_output=gather_output, shared_input=shared_input, name=dense.name,
                    dtype=dense.dtype_policy)
        layer._copy_from(dense)
        return layer

    def _copy_from(self, dense: keras.layers.Dense) -> None:
        _replace_build(self, dense, (None, dense.kernel.shape[0]))
        self.kernel.assign(_shard_kernel(dense.kernel, self.split, self.tp))
        if self.use_bias:
            self.bias.assign(_shard_rows(dense.bias, self.split, self.tp))

    def build(self, input_shape: tuple) -> None:
        self.kernel = mark_sharded(
            self._weight("kernel", (input_shape[-1], self.local_units), self.kernel_initializer),
            self.split)
        self.bias = None
        if self.use_bias:
            self.bias = mark_sharded(
                self._weight("bias", (self.local_units,), self.bias_initializer), self.split)

    def call(self, x: Any) -> Any:
        # (b, t/tp, in) under sequence parallelism, else (b, t, in) -> (b, t, in)
        x = self.tp.enter_column_region(x, shared=self.shared_input)
        y = ops.matmul(x, self.kernel)  # (b, t, out/tp)
        if self.bias is not None:
            y = ops.add(y, self.bias)
        return gather_from_region(y, self.tp) if self.gather_output else y

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        width = self.local_units * (self.tp.size if self.gather_output else 1)
        return tuple(input_shape[:-1]) + (width,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"units": self.units, "use_bias": self.use_bias, "parts": self.parts,
                       "gather_output": self.gather_output, "shared_input": self.shared_input,
                       "kernel_initializer": _serialize(self.kernel_initializer),
                       "bias_initializer": _serialize(self.bias_initializer)})
        return config


@keras.saving.register_keras_serializable(package="hvdllm")
class RowParallelDense(_TensorParallelLayer):
    """y = x W + b with W split by input rows; partial products are summed over TP.

    Args:
        units: output width.
        tp: the tensor-parallel group (not part of ``get_config``: pass it again).
        use_bias: add a bias (replicated), once, after the reduction.
        input_is_parallel: x already holds this rank's slice of the last axis
            (the output of a column-parallel layer); otherwise it is split here.
        kernel_initializer, bias_initializer: for a layer not made by
            :meth:`from_dense`.
    """

    def __init__(self, units: int, tp: TensorParallelGroup, use_bias: bool = True,
                 input_is_parallel: bool = True, kernel_initializer: Any = "glorot_uniform",
                 bias_initializer: Any = "zeros", **kwargs: Any):
        super().__init__(tp, **kwargs)
        self.units = units
        self.use_bias = use_bias
        self.input_is_parallel = input_is_parallel
        self.kernel_initializer = kernel_initializer  # see ColumnParallelDense
        self.bias_initializer = bias_initializer
        self.split = Split.row()

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, tp: TensorParallelGroup,
                   input_is_parallel: bool = True) -> "RowParallelDense":
        """Slice a full, built ``Dense``; its bias variable is kept as it is."""
        _check_plain_dense(dense)
        layer = cls(dense.units, tp, use_bias=dense.use_bias,
                    input_is_parallel=input_is_parallel, name=dense.name,
                    dtype=dense.dtype_policy)
        full_in = dense.kernel.shape[0]
        _replace_build(layer, dense, (None, full_in),
                       reuse={"bias": dense.bias} if dense.use_bias else None)
        layer.kernel.assign(_shard_kernel(dense.kernel, layer.split, tp))
        return layer

    def build(self, input_shape: tuple) -> None:
        # input_shape is the full width (what the replaced Dense was built for).
        local_in = self.split.shard_shape((self.units, input_shape[-1]), self.tp.size)[1]
        self.kernel = mark_sharded(
            self._weight("kernel", (local_in, self.units), self.kernel_initializer), self.split)
        self.bias = self._weight("bias", (self.units,), self.bias_initializer) \
            if self.use_bias else None

    def call(self, x: Any) -> Any:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.tp)
        y = ops.matmul(x, self.kernel)
        if self.tp.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.tp)  # (b, t, out) -> (b, t/tp, out)
        else:
            y = reduce_from_region(y, self.tp)
        return y if self.bias is None else ops.add(y, self.bias)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"units": self.units, "use_bias": self.use_bias,
                       "input_is_parallel": self.input_is_parallel,
                       "kernel_initializer": _serialize(self.kernel_initializer),
                       "bias_initializer": _serialize(self.bias_initializer)})
        return config


@keras.saving.register_keras_serializable(package="hvdllm")
class VocabParallelEmbedding(_TensorParallelLayer):
    """Token embedding with the (padded) vocabulary split into contiguous row ranges.

    Ids outside this rank's range look up row 0 and are then zeroed, so the
    sum over ranks holds exactly one real row per id.  The padded rows (past
    ``vocab_size``, on the last ranks) are zero and never looked up.

    Args:
        vocab_size: real vocabulary size.
        output_dim: embedding width.
        tp: the tensor-parallel group (not part of ``get_config``: pass it again).
        embeddings_initializer: for a layer not made by :meth:`from_dense`.
    """

    def __init__(self, vocab_size: int, output_dim: int, tp: TensorParallelGroup,
                 embeddings_initializer: Any = "uniform", **kwargs: Any):
        super().__init__(tp, **kwargs)
        self.vocab_size = vocab_size
        self.output_dim = output_dim
        self.embeddings_initializer = embeddings_initializer  # see ColumnParallelDense
        self.split = Split.vocab(vocab_size)
        self.rows = padded_vocab_size(vocab_size, tp.size) // tp.size
        self.vocab_start = tp.rank * self.rows

    @classmethod
    def from_dense(cls, embedding: keras.layers.Embedding, tp: TensorParallelGroup
                   ) -> "VocabParallelEmbedding":
        """Slice a full, built ``Embedding`` (rows padded with zeros to a multiple of tp)."""
        layer = cls(embedding.input_dim, embedding.output_dim, tp, name=embedding.name,
                    dtype=embedding.dtype_policy)
        _replace_build(layer, embedding, (None, None))
        layer.embeddings.assign(_shard_rows(embedding.embeddings, layer.split, tp))
        return layer

    def build(self, input_shape: tuple) -> None:
        self.embeddings = mark_sharded(
            self._weight("embeddings", (self.rows, self.output_dim),
                         self.embeddings_initializer), self.split)

    def call(self, ids: Any) -> Any:
        ids = ops.convert_to_tensor(ids)
        if ids.dtype not in ("int32", "int64"):
            ids = ops.cast(ids, "int32")
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.rows)
        x = ops.take(self.embeddings, ops.where(inside, local, 0), axis=0)
        x = x * ops.cast(inside, x.dtype)[..., None]
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence(x, self.tp)  # (b, t/tp, d)
        return reduce_from_region(x, self.tp)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"vocab_size": self.vocab_size, "output_dim": self.output_dim,
                       "embeddings_initializer": _serialize(self.embeddings_initializer)})
        return config


@keras.saving.register_keras_serializable(package="hvdllm")
class VocabParallelLMHead(ColumnParallelDense):
    """The output projection over the padded vocabulary, split by vocabulary columns.

    Its logits stay split along the vocabulary (the last axis); the loss is
    :class:`VocabParallelCrossEntropy`.  Padded columns are zero and their
    logits are masked by the loss.  (GPT's tied head needs no layer: it
    reads the :class:`VocabParallelEmbedding` shard.)

    Args:
        units: real vocabulary size.
        tp: the tensor-parallel group.
    """

    def __init__(self, units: int, tp: TensorParallelGroup, **kwargs: Any):
        kwargs.update(use_bias=False, parts=1, gather_output=False)
        super().__init__(units, tp, **kwargs)

    @property
    def split(self) -> Split:
        return Split.vocab(self.units)

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, tp: TensorParallelGroup, **kwargs: Any
                   ) -> "VocabParallelLMHead":
        """Slice a full, built, bias-free ``Dense`` (vocabulary padded with zero columns)."""
        _check_plain_dense(dense)
        if dense.use_bias:
            raise ValueError(f"the head {dense.name} has a bias; a vocabulary-parallel head "
                             f"has none")
        layer = cls(dense.units, tp, shared_input=kwargs.get("shared_input", False),
                    name=dense.name, dtype=dense.dtype_policy)
        layer._copy_from(dense)
        return layer

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("use_bias", "parts", "gather_output"):
            config.pop(key)
        return config


@keras.saving.register_keras_serializable(package="hvdllm")
class SequenceParallelPositionEmbedding(_TensorParallelLayer):
    """Learned positions (replicated) that return only this rank's rows under sequence parallelism.

    Stands in for :class:`hvdllm.tensorflow.models.PositionEmbedding`, whose
    output is added to the (sequence-split) token embedding ``x``: for an
    ``x`` of ``t`` positions it returns rows ``rank * t .. (rank + 1) * t``
    under sequence parallelism, else rows ``0 .. t``.

    Args:
        seq_len: the longest (whole) sequence.
        tp: the tensor-parallel group (not part of ``get_config``: pass it again).
        init_std: standard deviation of the initialisation, for a layer not
            made by :meth:`from_dense`.
    """

    def __init__(self, seq_len: int, tp: TensorParallelGroup, init_std: float = 0.02,
                 **kwargs: Any):
        super().__init__(tp, **kwargs)
        self.seq_len = seq_len
        self.init_std = init_std

    @classmethod
    def from_dense(cls, positions: keras.layers.Layer, tp: TensorParallelGroup
                   ) -> "SequenceParallelPositionEmbedding":
        """The same layer, its embeddings variable kept as it is."""
        layer = cls(positions.seq_len, tp, positions.init_std, name=positions.name,
                    dtype=positions.dtype_policy)
        _replace_build(layer, positions, (None, None, positions.embeddings.shape[-1]),
                       reuse={"embeddings": positions.embeddings})
        return layer

    def build(self, input_shape: tuple) -> None:
        self.embeddings = self._weight(
            "embeddings", (self.seq_len, input_shape[-1]),
            {"class_name": "RandomNormal", "config": {"stddev": self.init_std}})

    def call(self, x: Any) -> Any:
        t = ops.shape(x)[1]
        start = self.tp.rank * t if self.tp.sequence_parallel else 0
        return self.embeddings[start:start + t]  # (t, d_model)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[1], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"seq_len": self.seq_len, "init_std": self.init_std})
        return config


class ColumnRegionInput(_TensorParallelLayer):
    """A layer whose output enters a column-parallel product the model computes itself.

    GPT's tied head multiplies the final norm's output by the embedding
    (a :class:`VocabParallelEmbedding` shard under TP) without a layer of
    its own; wrapping the norm puts the region's entry (identity forward,
    allreduce backward; the sequence allgathered under sequence
    parallelism) right before that product.  The wrapped layer's variables
    are unchanged, and its attributes (``gamma``, ``beta``) read through.

    Args:
        layer: the layer to wrap (built).
        tp: the tensor-parallel group.
    """

    def __init__(self, layer: keras.layers.Layer, tp: TensorParallelGroup, **kwargs: Any):
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(tp, **kwargs)
        self.layer = layer
        self.built = layer.built

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks: the wrapped layer's.
        layer = self.__dict__.get("layer")
        if layer is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(layer, name)

    def call(self, x: Any) -> Any:
        return self.tp.enter_column_region(self.layer(x))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        shape = tuple(self.layer.compute_output_shape(input_shape))
        if self.tp.sequence_parallel and shape[1] is not None:
            shape = (shape[0], shape[1] * self.tp.size) + shape[2:]
        return shape


class VocabParallelCrossEntropy:
    """Mean next-token cross-entropy from vocabulary-split logits.

    Each rank reduces its own columns to three numbers per position (its
    max, its sum of exponentials relative to that max, and the target's
    logit if the target is among its columns); one allgather of those
    gives every rank the log-sum-exp and the target logit, so the full
    logits never exist on one rank.  The gradient, softmax minus one-hot on
    this rank's columns, needs no communication.  Padded vocabulary columns
    are masked out.  Drop-in for :class:`hvdllm.tensorflow.models.LMCrossEntropy`.

    Args:
        vocab_size: real (unpadded) vocabulary size.
        tp: the tensor-parallel group.
    """

    def __init__(self, vocab_size: int, tp: TensorParallelGroup):
        self.vocab_size = vocab_size
        self.tp = tp
        self.vocab_start = tp.rank * (padded_vocab_size(vocab_size, tp.size) // tp.size)

    def __call__(self, logits: Any, targets: Any) -> tf.Tensor:
        logits = tf.convert_to_tensor(logits)
        targets = tf.reshape(tf.cast(targets, tf.int32), [-1])
        return _vocab_parallel_cross_entropy(logits, targets, self.tp, self.vocab_start,
                                             self.vocab_size)

    def full_logits(self, logits: Any) -> tf.Tensor:
        """Every rank's logits over the whole real vocabulary."""
        return gather_from_region(tf.convert_to_tensor(logits), self.tp)[..., :self.vocab_size]


def _vocab_parallel_cross_entropy(logits: tf.Tensor, targets: tf.Tensor,
                                  tp: TensorParallelGroup, vocab_start: int,
                                  vocab_size: int) -> tf.Tensor:
    n_local = logits.shape[-1]
    real = min(n_local, max(0, vocab_size - vocab_start))  # this rank's unpadded columns

    @tf.custom_gradient
    def loss_fn(logits):
        flat = tf.reshape(tf.cast(logits, tf.float32), [-1, n_local])  # (n, v/tp)
        if real < n_local:  # padded vocabulary entries can never be predicted
            flat = tf.where(tf.range(n_local) < real, flat, float("-inf"))
        if real > 0:
            local_max = tf.reduce_max(flat, axis=-1)
            exp = tf.exp(flat - local_max[:, None])
            local_sum = tf.reduce_sum(exp, axis=-1)
        else:
            local_max = tf.fill(tf.shape(flat)[:1], float("-inf"))
            exp = tf.zeros_like(flat)
            local_sum = tf.zeros_like(local_max)
        local_target = targets - vocab_start
        inside = (local_target >= 0) & (local_target < n_local)
        local_target = tf.where(inside, local_target, 0)
        target_logit = tf.where(inside, tf.gather(flat, local_target[:, None], batch_dims=1)[:, 0],
                                0.0)
        if tp.size > 1:
            stats = tp.all_gather(tf.stack([local_max, local_sum, target_logit])[None], 0)
        else:
            stats = tf.stack([local_max, local_sum, target_logit])[None]
        maxes, sums, targets_logit = stats[:, 0], stats[:, 1], stats[:, 2]  # (tp, n) each
        row_max = tf.reduce_max(maxes, axis=0)
        sum_exp = tf.reduce_sum(sums * tf.exp(maxes - row_max), axis=0)
        log_z = row_max + tf.math.log(sum_exp)
        losses = log_z - tf.reduce_sum(targets_logit, axis=0)
        n = tf.cast(tf.shape(flat)[0], tf.float32)

        def grad(upstream):
            softmax = exp * tf.exp(local_max - log_z)[:, None]
            one_hot = tf.one_hot(local_target, n_local, dtype=tf.float32) * \
                tf.cast(inside, tf.float32)[:, None]
            g = (softmax - one_hot) * (upstream / n)
            return tf.cast(tf.reshape(g, tf.shape(logits)), logits.dtype)

        return tf.reduce_mean(losses), grad

    return loss_fn(logits)
