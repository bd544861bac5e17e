"""The contract between the shared training loop and a framework adapter.

A framework adapter (``hvdllm.torch.engine``, ``hvdllm.tensorflow.engine``)
provides ``build_engine(cfg, groups, threads)`` returning an object with
this interface.  The loop in :mod:`hvdllm.train.loop` owns data order,
learning-rate schedule, logging, timing and checkpoint cadence; the engine
owns the model, the optimizer and the gradient communication.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from ..common.train_checkpoint import CheckpointReader, RankState


class Engine(Protocol):
    """What the training loop needs from a framework adapter."""

    #: Number of model parameters (all shards together).
    num_params: int

    def describe(self) -> list[str]:
        """Lines for the start-up log beyond the common one (e.g. the pipeline split)."""

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

    def eval_loss(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Forward-only loss of this rank's micro-batches (validation).

        No gradients, no optimizer or other state change, no random draws
        (dropout off).  Collective over the tensor- and pipeline-parallel
        groups: with pp > 1 the loss is computed on the last stage and
        returned on every stage.

        Returns:
            The mean over ``micro_batches`` of each one's mean token
            cross-entropy.
        """

    def step_metrics(self) -> dict[str, Any]:
        """Extras of the last step for ``metrics.jsonl`` (``comm_bytes``, ``grad_norm``,
        ``loss_scale`` and ``skipped`` with fp16); may be empty."""

    def capture_state(self, state: RankState) -> None:
        """Copy this rank's part of a training checkpoint into ``state`` (host memory).

        Everything a later step reads: parameter shards, optimizer state,
        loss scaler, compression state, random generator states.  Not
        collective; the copies do not change when training goes on.
        """

    def restore_state(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        """Load this rank's part of a checkpoint, re-slicing logical tensors as needed.

        Args:
            reader: the checkpoint.
            same_layout: it was written by the same framework at the same
                dp x tp x pp; rank-private state is restored only then.

        Returns:
            Notes for the log (state that could not carry over).
        """

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        """Sample ``max_new_tokens`` tokens after ``prompt`` (1-D int array)."""
