"""The LLaMA feed-forward block: ``w_down(silu(w_gate(x)) * w_up(x))``, no biases."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

from .base import dense


@keras.saving.register_keras_serializable(package="hvdllm")
class SwiGLU(keras.layers.Layer):
    """Gated MLP ``d_model -> d_ff -> d_model``.

    Args:
        d_model: input and output feature size.
        d_ff: hidden width.
        init_std: standard deviation of the gate and up kernels.
        proj_init_std: standard deviation of the down projection.
    """

    def __init__(self, d_model: int, d_ff: int, init_std: float = 0.02,
                 proj_init_std: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.d_ff = d_ff
        self.init_std = init_std
        self.proj_init_std = proj_init_std

    def build(self, input_shape: tuple) -> None:
        self.w_gate = dense(self.d_ff, self.init_std, "w_gate")
        self.w_gate.build(input_shape)
        self.w_up = dense(self.d_ff, self.init_std, "w_up")
        self.w_up.build(input_shape)
        self.w_down = dense(self.d_model, self.proj_init_std, "w_down")
        self.w_down.build(tuple(input_shape[:-1]) + (self.d_ff,))
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        return self.w_down(ops.silu(self.w_gate(x)) * self.w_up(x))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "d_ff": self.d_ff, "init_std": self.init_std,
                       "proj_init_std": self.proj_init_std})
        return config
