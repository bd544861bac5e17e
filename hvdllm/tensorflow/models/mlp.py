"""The transformer feed-forward block: expand 4x, GELU, project back."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="hvdllm")
class MLP(keras.layers.Layer):
    """Position-wise ``d_model -> 4 * d_model -> d_model`` with exact GELU.

    Args:
        d_model: input and output feature size.
        init_std: standard deviation of the expanding kernel initialisation.
        proj_init_std: standard deviation of the output projection kernel.
    """

    def __init__(self, d_model: int, init_std: float = 0.02, proj_init_std: float = 0.02,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.init_std = init_std
        self.proj_init_std = proj_init_std

    def build(self, input_shape: tuple) -> None:
        hidden = 4 * self.d_model
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
        # The erf form of GELU, as in torch's default and GPT-2.
        return self.proj(ops.gelu(self.fc(x), approximate=False))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"d_model": self.d_model, "init_std": self.init_std,
                       "proj_init_std": self.proj_init_std})
        return config
