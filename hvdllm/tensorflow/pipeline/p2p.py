"""Tensors between pipeline stages: the TensorFlow face of :class:`hvdllm.common.p2p.Link`.

The framing, the shape agreement at set-up, the deadlines and the errors
that name both stages are the core's (:mod:`hvdllm.common.p2p`), shared
with the torch executor.  Here an eager tensor leaves as its numpy value and
a receive lands in a numpy buffer of the agreed spec that becomes a tensor
once the header has been checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from ...common.comm import Group
from ...common.p2p import ArraySpec, Link, MessageError, SendHandle

#: Two pipeline stages disagree about a message (shape, dtype or layout).
PipelineCommError = MessageError

# The dtypes stages may exchange.
_DTYPES = (tf.float32, tf.float16, tf.bfloat16, tf.float64)


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of a tensor that crosses a stage boundary."""

    dtype: tf.DType
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: tf.Tensor) -> "TensorSpec":
        return cls(tensor.dtype, tuple(int(s) for s in tensor.shape))

    def __str__(self) -> str:
        return f"{self.dtype.name}[{','.join(map(str, self.shape))}]"

    @property
    def wire(self) -> ArraySpec:
        """The framework-free spec the message header carries."""
        if self.dtype not in _DTYPES:
            names = ", ".join(d.name for d in _DTYPES)
            raise PipelineCommError(f"pipeline messages cannot carry {self}; supported: {names}")
        return ArraySpec(self.dtype.name, tuple(self.shape))


class RecvHandle:
    """A posted receive of an agreed spec; :meth:`wait` returns the tensor."""

    def __init__(self, link: "StageLink", peer: int, tag: int, spec: TensorSpec, what: str):
        buffer = np.empty(spec.shape, spec.dtype.as_numpy_dtype)
        self._bytes = link.wire.irecv(peer, tag, spec.wire, what, buffer)
        self.what = what

    def wait(self) -> tf.Tensor:
        """The received tensor, after checking it is what the stages agreed on."""
        return tf.convert_to_tensor(self._bytes.wait())


class StageLink:
    """Point-to-point tensors between the stages of one pipeline group.

    Args:
        group: this rank's pipeline :class:`~hvdllm.common.comm.Group`; its
            communicator is duplicated (collective over the group).
    """

    def __init__(self, group: Group):
        self.wire = Link(group, "pipeline", "stage")
        self.group = group
        self.comm = self.wire.comm

    def stage_name(self, stage: int) -> str:
        return self.wire.member_name(stage)

    def check_tags(self, largest: int) -> None:
        """Raise unless schedule tags up to ``largest`` fit this MPI's tag range."""
        self.wire.check_tags(largest)

    def isend(self, tensor: tf.Tensor, peer: int, tag: int, what: str) -> SendHandle:
        """Post a send of ``tensor``'s value to pipeline stage ``peer``."""
        data = np.ascontiguousarray(tensor.numpy())
        return self.wire.isend(data, peer, tag, what, TensorSpec.of(tensor).wire)

    def irecv(self, peer: int, tag: int, spec: TensorSpec, what: str) -> RecvHandle:
        """Post a receive of a ``spec`` tensor from pipeline stage ``peer``."""
        return RecvHandle(self, peer, tag, spec, what)

    def agree(self, outgoing: Sequence[tuple[int, int, TensorSpec]],
              incoming: Sequence[tuple[int, int, TensorSpec, str]]) -> None:
        """Exchange the specs of every message a step will carry; fail on a mismatch.

        Args:
            outgoing: ``(peer, tag, spec)`` of each message this stage will send.
            incoming: ``(peer, tag, spec, what)`` of each message it expects.
        """
        self.wire.agree([(peer, tag, spec.wire) for peer, tag, spec in outgoing],
                        [(peer, tag, spec.wire, what) for peer, tag, spec, what in incoming])

    def exchange(self, tensor: tf.Tensor, peer: int, tag: int, what: str) -> tf.Tensor:
        """Send ``tensor`` to ``peer`` and return the same-spec tensor ``peer`` sends back."""
        recv = self.irecv(peer, tag, TensorSpec.of(tensor), what)
        send = self.isend(tensor, peer, tag, what)
        out = recv.wait()
        send.wait()
        return out

    def free(self) -> None:
        """Release the duplicated communicator."""
        self.wire.free()
