"""The contract between the shared training loop and a framework adapter.

A framework adapter (``hvdllm.torch.engine``, ``hvdllm.tensorflow.engine``)
provides a class with this interface.  The loop in :mod:`hvdllm.train.loop`
owns data order, learning-rate schedule, logging and timing; the engine
owns the model, the optimizer and the gradient communication.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Engine(Protocol):
    """What the training loop needs from a framework adapter."""

    #: Number of model parameters (all shards together).
    num_params: int

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   lr: float) -> float:
        """One optimizer step over this rank's micro-batches.

        Args:
            micro_batches: (inputs, targets) int64 arrays of shape
                (micro_batch_size, seq_len), in accumulation order.
            lr: learning rate for this step.

        Returns:
            This rank's loss: the mean over its micro-batches of each
            micro-batch's mean token cross-entropy.
        """

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        """Sample ``max_new_tokens`` tokens after ``prompt`` (1-D int array)."""

    def parameter_checksum(self) -> float:
        """Sum of all parameters, for checking that ranks stay in sync."""
