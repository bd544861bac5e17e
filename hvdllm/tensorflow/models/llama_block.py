"""One LLaMA block: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``."""
from __future__ import annotations

from typing import Any

import keras

from .llama_attention import LlamaAttention
from .rms_norm import RMSNorm
from .swiglu import SwiGLU


@keras.saving.register_keras_serializable(package="hvdllm")
class LlamaBlock(keras.layers.Layer):
    """Pre-RMSNorm attention and SwiGLU branches on the residual stream.

    Args:
        d_model, n_head, n_kv_head, seq_len, rope_theta: as :class:`LlamaAttention`.
        d_ff: SwiGLU hidden width.
        norm_eps: RMSNorm epsilon.
        dropout: dropout rate on attention probabilities and on both branches.
        init_std: standard deviation of the input-side kernels.
        proj_init_std: standard deviation of the two residual projections.
    """

    def __init__(self, d_model: int, n_head: int, d_ff: int, n_kv_head: int = 0,
                 seq_len: int = 64, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 dropout: float = 0.0, init_std: float = 0.02, proj_init_std: float = 0.02,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.d_model, self.n_head, self.d_ff = d_model, n_head, d_ff
        self.n_kv_head = n_kv_head or n_head
        self.seq_len, self.rope_theta, self.norm_eps = seq_len, rope_theta, norm_eps
        self.dropout, self.init_std, self.proj_init_std = dropout, init_std, proj_init_std

    def build(self, input_shape: tuple) -> None:
        self.attn_norm = RMSNorm(self.norm_eps, name="attn_norm")
        self.attn = LlamaAttention(self.d_model, self.n_head, self.n_kv_head, self.seq_len,
                                   self.rope_theta, self.dropout, self.init_std,
                                   self.proj_init_std, name="attn")
        self.mlp_norm = RMSNorm(self.norm_eps, name="mlp_norm")
        self.mlp = SwiGLU(self.d_model, self.d_ff, self.init_std, self.proj_init_std, name="mlp")
        for layer in (self.attn_norm, self.attn, self.mlp_norm, self.mlp):
            layer.build(input_shape)
        self.drop = keras.layers.Dropout(self.dropout, name="drop")
        super().build(input_shape)

    def call(self, x: Any, training: bool = False) -> Any:
        x = x + self.drop(self.attn(self.attn_norm(x), training=training), training=training)
        return x + self.drop(self.mlp(self.mlp_norm(x)), training=training)

    def call_cached(self, x: Any, start: int, past: tuple | None) -> tuple[Any, tuple]:
        """``call`` for new positions at ``start ..`` after ``past`` (inference: no dropout)."""
        a, present = self.attn.call_cached(self.attn_norm(x), start, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "n_head": self.n_head, "d_ff": self.d_ff,
                       "n_kv_head": self.n_kv_head, "seq_len": self.seq_len,
                       "rope_theta": self.rope_theta, "norm_eps": self.norm_eps,
                       "dropout": self.dropout, "init_std": self.init_std,
                       "proj_init_std": self.proj_init_std})
        return config
