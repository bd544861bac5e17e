"""One pre-LayerNorm GPT block: attention and MLP, each on a residual branch."""
from __future__ import annotations

from typing import Any

import keras

from .causal_self_attention import CausalSelfAttention
from .mlp import MLP

# torch's LayerNorm default; Keras defaults to 1e-3.
LAYER_NORM_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="hvdllm")
class TransformerBlock(keras.layers.Layer):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Args:
        d_model: residual stream width.
        n_head: attention heads.
        d_ff: MLP hidden width (0: ``4 * d_model``).
        norm_eps: LayerNorm epsilon.
        dropout: dropout rate on attention probabilities and on both branches.
        init_std: standard deviation of the input-side kernels.
        proj_init_std: standard deviation of the two residual projections.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, init_std: float = 0.02,
                 proj_init_std: float = 0.02, d_ff: int = 0,
                 norm_eps: float = LAYER_NORM_EPSILON, **kwargs: Any):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.n_head = n_head
        self.d_ff = d_ff or 4 * d_model
        self.norm_eps = norm_eps
        self.dropout = dropout
        self.init_std = init_std
        self.proj_init_std = proj_init_std

    def build(self, input_shape: tuple) -> None:
        self.ln_1 = keras.layers.LayerNormalization(epsilon=self.norm_eps, name="ln_1")
        self.ln_1.build(input_shape)
        self.attn = CausalSelfAttention(self.d_model, self.n_head, dropout=self.dropout,
                                        init_std=self.init_std,
                                        proj_init_std=self.proj_init_std, name="attn")
        self.attn.build(input_shape)
        self.ln_2 = keras.layers.LayerNormalization(epsilon=self.norm_eps, name="ln_2")
        self.ln_2.build(input_shape)
        self.mlp = MLP(self.d_model, self.d_ff, init_std=self.init_std,
                       proj_init_std=self.proj_init_std, name="mlp")
        self.mlp.build(input_shape)
        self.drop = keras.layers.Dropout(self.dropout, name="drop")
        super().build(input_shape)

    def call(self, x: Any, training: bool = False) -> Any:
        x = x + self.drop(self.attn(self.ln_1(x), training=training), training=training)
        return x + self.drop(self.mlp(self.ln_2(x)), training=training)

    def call_cached(self, x: Any, start: int, past: tuple | None) -> tuple[Any, tuple]:
        """``call`` for new positions after ``past`` (inference: no dropout)."""
        a, present = self.attn.call_cached(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "n_head": self.n_head, "dropout": self.dropout,
                       "init_std": self.init_std, "proj_init_std": self.proj_init_std,
                       "d_ff": self.d_ff, "norm_eps": self.norm_eps})
        return config
