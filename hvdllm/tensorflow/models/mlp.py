"""The transformer feed-forward block: expand to ``d_ff``, tanh GELU, project back."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="hvdllm")
class MLP(keras.layers.Layer):
    """Position-wise ``d_model -> d_ff -> d_model`` with the tanh form of GELU.

    Args:
        d_model: input and output feature size.
        d_ff: hidden width (0: ``4 * d_model``, GPT's default).
        init_std: standard deviation of the expanding kernel initialisation.
        proj_init_std: standard deviation of the output projection kernel.
    """

    def __init__(self, d_model: int, d_ff: int = 0, init_std: float = 0.02,
                 proj_init_std: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.d_ff = d_ff or 4 * d_model
        self.init_std = init_std
        self.proj_init_std = proj_init_std

    def build(self, input_shape: tuple) -> None:
        hidden = self.d_ff
        self.fc = keras.layers.Dense(
            hidden, name="fc",
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.init_std))
        self.fc.build(input_shape)
        self.proj = keras.layers.Dense(
            self.d_model, name="proj",
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.proj_init_std))
        self.proj.build(tuple(input_shape[:-1]) + (hidden,))
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        # The tanh form of GELU: GPT-2's "gelu_new", as the torch GPT computes it.
        return self.proj(ops.gelu(self.fc(x), approximate=True))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "d_ff": self.d_ff, "init_std": self.init_std,
                       "proj_init_std": self.proj_init_std})
        return config
