"""Root-mean-square normalisation (LLaMA), computed in float32."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="hvdllm")
class RMSNorm(keras.layers.Layer):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis.

    Args:
        eps: added to the mean square.
    """

    def __init__(self, eps: float = 1e-5, **kwargs: Any):
        super().__init__(**kwargs)
        self.eps = eps

    def build(self, input_shape: tuple) -> None:
        self.weight = self.add_weight(name="weight", shape=(input_shape[-1],),
                                      initializer="ones")
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        h = ops.cast(x, "float32")
        h = h * ops.rsqrt(ops.mean(ops.square(h), axis=-1, keepdims=True) + self.eps)
        return self.weight * ops.cast(h, x.dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"eps": self.eps})
        return config
