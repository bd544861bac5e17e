"""LLaMA attention: rotary positions, grouped-query heads, causal softmax, no biases."""
from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from .base import cached_attention, dense
from .rotary import apply_rope, rope_tables


@keras.saving.register_keras_serializable(package="hvdllm")
class LlamaAttention(keras.layers.Layer):
    """Causal self-attention with ``n_kv_head`` key/value heads shared by groups of queries.

    Args:
        d_model: residual stream width.
        n_head: query heads.
        n_kv_head: key/value heads (divides ``n_head``; 0 = ``n_head``).
        seq_len: longest sequence (size of the rotary tables).
        rope_theta: rotary base.
        dropout: dropout rate on the attention probabilities.
        init_std: standard deviation of the q, k, v kernels.
        proj_init_std: standard deviation of the output projection.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int = 0, seq_len: int = 64,
                 rope_theta: float = 10000.0, dropout: float = 0.0, init_std: float = 0.02,
                 proj_init_std: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.seq_len = seq_len
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.init_std = init_std
        self.proj_init_std = proj_init_std
        self.head_dim = d_model // n_head
        cos, sin = rope_tables(seq_len, self.head_dim, rope_theta)
        self._cos, self._sin = ops.convert_to_tensor(cos), ops.convert_to_tensor(sin)

    def build(self, input_shape: tuple) -> None:
        kv = self.n_kv_head * self.head_dim
        self.wq = dense(self.n_head * self.head_dim, self.init_std, "wq")
        self.wk = dense(kv, self.init_std, "wk")
        self.wv = dense(kv, self.init_std, "wv")
        self.wo = dense(self.d_model, self.proj_init_std, "wo")
        for layer in (self.wq, self.wk, self.wv):
            layer.build(input_shape)
        self.wo.build(tuple(input_shape[:-1]) + (self.n_head * self.head_dim,))
        self.attn_dropout = keras.layers.Dropout(self.dropout, name="attn_dropout")
        super().build(input_shape)

    def _heads(self, z: Any, b: Any, t: Any) -> Any:
        """(b, t, heads * head_dim) -> (b, heads, t, head_dim)."""
        return ops.transpose(ops.reshape(z, (b, t, -1, self.head_dim)), (0, 2, 1, 3))

    def call(self, x: Any, training: bool = False) -> Any:
        q, k, v = (layer(x) for layer in (self.wq, self.wk, self.wv))
        # Sizes from the projections, not from x (see CausalSelfAttention).
        b, t = ops.shape(q)[0], ops.shape(q)[1]
        q, k, v = (self._heads(z, b, t) for z in (q, k, v))
        cos, sin = self._cos[:t], self._sin[:t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_head // self.n_kv_head
        if group > 1:  # query head h reads key/value head h // group
            k, v = ops.repeat(k, group, axis=1), ops.repeat(v, group, axis=1)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(self.head_dim)
        causal = ops.tril(ops.ones((t, t), dtype="bool"))
        scores = ops.where(causal, scores, float("-inf"))
        probs = self.attn_dropout(ops.softmax(scores, axis=-1), training=training)
        y = ops.matmul(probs, v)  # (b, heads, t, head_dim)
        return self.wo(ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, -1)))

    def call_cached(self, x: Any, start: int, past: tuple | None) -> tuple[Any, tuple]:
        """Attention of new positions ``x`` (b, t, d), at ``start ..``, over ``past`` and themselves.

        The cache holds the rotated keys and the values of the ``n_kv_head``
        heads, each (b, kv_heads, past + t, head_dim), before the group repeat.
        """
        b, t = int(x.shape[0]), int(x.shape[1])
        q, k, v = (self._heads(layer(x), b, t) for layer in (self.wq, self.wk, self.wv))
        cos, sin = self._cos[start:start + t], self._sin[start:start + t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = ops.concatenate([past[0], k], axis=2), ops.concatenate([past[1], v], axis=2)
        present = (k, v)
        group = int(q.shape[1]) // int(k.shape[1])
        if group > 1:
            k, v = ops.repeat(k, group, axis=1), ops.repeat(v, group, axis=1)
        y = cached_attention(q, k, v, self.head_dim)
        return self.wo(ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, -1))), present

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "n_head": self.n_head,
                       "n_kv_head": self.n_kv_head, "seq_len": self.seq_len,
                       "rope_theta": self.rope_theta, "dropout": self.dropout,
                       "init_std": self.init_std, "proj_init_std": self.proj_init_std})
        return config
