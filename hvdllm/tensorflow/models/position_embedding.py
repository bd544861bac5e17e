"""Learned absolute position embedding, sliced to the input's length."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="hvdllm")
class PositionEmbedding(keras.layers.Layer):
    """One learned vector per position, for sequences of up to ``seq_len`` tokens.

    Returns the embeddings of positions ``0..t-1`` for an input of shape
    ``(b, t, d_model)``; the caller adds them to the token embeddings.
    Slicing (rather than gathering positions) keeps the gradient dense.

    Args:
        seq_len: the longest sequence the layer accepts.
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(self, seq_len: int, init_std: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self.seq_len = seq_len
        self.init_std = init_std

    def build(self, input_shape: tuple) -> None:
        d_model = input_shape[-1]
        self.embeddings = self.add_weight(
            shape=(self.seq_len, d_model), name="embeddings",
            initializer=keras.initializers.RandomNormal(stddev=self.init_std))
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        t = ops.shape(x)[1]
        return self.embeddings[:t]  # (t, d_model)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[1], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"seq_len": self.seq_len, "init_std": self.init_std})
        return config
