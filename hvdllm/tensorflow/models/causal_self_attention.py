"""Multi-head causal self-attention with a fused query/key/value projection."""
from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from .base import cached_attention


@keras.saving.register_keras_serializable(package="hvdllm")
class CausalSelfAttention(keras.layers.Layer):
    """Each position attends to itself and earlier positions only.

    Args:
        d_model: residual stream width; input and output feature size.
        n_head: attention heads; must divide ``d_model``.
        dropout: dropout rate on the attention probabilities.
        init_std: standard deviation of the ``qkv`` kernel initialisation.
        proj_init_std: standard deviation of the output projection kernel;
            GPT-2 shrinks it with depth because it writes to the residual.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, init_std: float = 0.02,
                 proj_init_std: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.d_model = d_model
        self.n_head = n_head
        self.dropout = dropout
        self.init_std = init_std
        self.proj_init_std = proj_init_std
        self.head_dim = d_model // n_head

    def build(self, input_shape: tuple) -> None:
        self.qkv = keras.layers.Dense(
            3 * self.d_model, name="qkv",
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.init_std))
        self.qkv.build(input_shape)
        self.proj = keras.layers.Dense(
            self.d_model, name="proj",
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.proj_init_std))
        self.proj.build(tuple(input_shape[:-1]) + (self.d_model,))
        self.attn_dropout = keras.layers.Dropout(self.dropout, name="attn_dropout")
        super().build(input_shape)

    def call(self, x: Any, training: bool = False) -> Any:
        qkv = self.qkv(x)
        # Sizes from the projection, not from x: under sequence parallelism x holds
        # part of the sequence and the projection gathers it; a tensor-parallel
        # shard holds only its own heads (-1).
        b, t = ops.shape(qkv)[0], ops.shape(qkv)[1]
        qkv = ops.reshape(qkv, (b, t, 3, -1, self.head_dim))
        # (b, t, 3, heads, head_dim) -> 3 x (b, heads, t, head_dim)
        q, k, v = ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), 3)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(self.head_dim)
        causal = ops.tril(ops.ones((t, t), dtype="bool"))  # (t, t): query row, key column
        scores = ops.where(causal, scores, float("-inf"))  # (b, heads, t, t)
        probs = self.attn_dropout(ops.softmax(scores, axis=-1), training=training)
        y = ops.matmul(probs, v)  # (b, heads, t, head_dim)
        y = ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, -1))
        return self.proj(y)

    def call_cached(self, x: Any, past: tuple | None) -> tuple[Any, tuple]:
        """Attention of new positions ``x`` (b, t, d) over ``past`` keys/values and themselves.

        Returns the output and the keys/values of every position so far,
        each (b, heads, past + t, head_dim).
        """
        b, t = int(x.shape[0]), int(x.shape[1])
        qkv = ops.reshape(self.qkv(x), (b, t, 3, -1, self.head_dim))
        q, k, v = ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), 3)
        if past is not None:
            k, v = ops.concatenate([past[0], k], axis=2), ops.concatenate([past[1], v], axis=2)
        y = cached_attention(q, k, v, self.head_dim)
        return self.proj(ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, -1))), (k, v)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "n_head": self.n_head, "dropout": self.dropout,
                       "init_std": self.init_std, "proj_init_std": self.proj_init_std})
        return config
