"""Tensors between pipeline stages: non-blocking point-to-point with agreed shapes.

:class:`StageLink` sends and receives torch tensors over a private
duplicate of the pipeline group's mpi4py communicator, so no other traffic
can ever match its tags.  A message with schedule tag ``t``
(:func:`hvdllm.common.schedules.message_tag`) travels as two MPI messages:
a small header (dtype code and shape) on tag ``2 t`` and the raw bytes on
tag ``2 t + 1``.

Shapes and dtypes are agreed once at set-up (:meth:`StageLink.agree`): each
sender tells each receiver what it will send, and a receiver that expects
something else fails there, naming both stages.  A receive then posts both
of its MPI receives at once (the payload buffer has the agreed size), and
its :meth:`RecvHandle.wait` checks the header against the agreement before
using the payload, so a message that does not match is an error naming
both stages, never garbage or a hang.  Every wait has the group's deadline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ...common import watchdog
from ...common.comm import Group, wait_requests
from ...common.errors import CommError

# Wire codes of the dtypes stages may exchange.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_DIMS = 6
_HEADER_LEN = 2 + _MAX_DIMS


class PipelineCommError(CommError):
    """Two pipeline stages disagree about a message (shape, dtype or layout)."""


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of a tensor that crosses a stage boundary."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tensor.dtype, tuple(tensor.shape))

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}[{','.join(map(str, self.shape))}]"

    def encode(self) -> np.ndarray:
        if self.dtype not in _DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
            raise PipelineCommError(f"pipeline messages cannot carry {self}; supported: {names}")
        if len(self.shape) > _MAX_DIMS:
            raise PipelineCommError(f"pipeline messages carry at most {_MAX_DIMS} dims, got {self}")
        header = np.zeros(_HEADER_LEN, np.int64)
        header[0], header[1] = _DTYPES.index(self.dtype), len(self.shape)
        header[2:2 + len(self.shape)] = self.shape
        return header

    @classmethod
    def decode(cls, header: np.ndarray) -> "TensorSpec":
        code, ndim = int(header[0]), int(header[1])
        if not 0 <= code < len(_DTYPES) or not 0 <= ndim <= _MAX_DIMS:
            raise PipelineCommError(f"malformed pipeline message header {header.tolist()}")
        return cls(_DTYPES[code], tuple(int(s) for s in header[2:2 + ndim]))


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous tensor's memory (what MPI reads or writes)."""
    return tensor.view(-1).view(torch.uint8).numpy()


class SendHandle:
    """A posted send; keeps its buffers alive until the send completes."""

    def __init__(self, requests: list, buffers: tuple, what: str, link: "StageLink", peer: int,
                 op: str):
        self._requests = requests
        self._buffers = buffers
        self.what = what
        self._link = link
        self._peer = peer
        self._op = op

    def test(self) -> bool:
        """True once the send has completed (never blocks); frees the buffers then."""
        from mpi4py import MPI

        if self._buffers and MPI.Request.Testall(self._requests):
            self._buffers = ()
        return not self._buffers

    def wait(self) -> None:
        if self._buffers:
            link = self._link
            link.poll(self._requests, self.what, time.monotonic() + link.group.timeout_sec,
                      self._op, self._peer, sum(b.nbytes for b in self._buffers))
            self._buffers = ()


class RecvHandle:
    """A posted receive of an agreed spec; :meth:`wait` returns the tensor."""

    def __init__(self, link: "StageLink", peer: int, tag: int, spec: TensorSpec, what: str):
        self._link = link
        self._peer = peer
        self._spec = spec
        self.what = what
        comm = link.comm
        self._header = np.empty(_HEADER_LEN, np.int64)
        self._payload = torch.empty(spec.shape, dtype=spec.dtype)
        self._header_req = comm.Irecv(self._header, source=peer, tag=2 * tag)
        self._payload_req = comm.Irecv(_raw_bytes(self._payload), source=peer, tag=2 * tag + 1)

    def wait(self) -> torch.Tensor:
        """The received tensor, after checking it is what the stages agreed on."""
        link = self._link
        deadline = time.monotonic() + link.group.timeout_sec
        link.poll([self._header_req], link.describe(f"receive of the header of {self.what}",
                                                    self._peer), deadline,
                  f"pipeline recv of {self.what}", self._peer)
        got = TensorSpec.decode(self._header)
        if got != self._spec:
            try:
                self._payload_req.Cancel()
            except Exception:  # already matched: nothing left to cancel
                pass
            raise PipelineCommError(
                f"pipeline {self.what}: {link.stage_name(link.group.rank)} expected "
                f"{self._spec} but {link.stage_name(self._peer)} sent {got}")
        link.poll([self._payload_req], link.describe(f"receive of {self.what} ({got})", self._peer),
                  deadline, f"pipeline recv of {self.what} payload", self._peer,
                  self._payload.numel() * self._payload.element_size())
        return self._payload


class StageLink:
    """Point-to-point tensors between the stages of one pipeline group.

    Args:
        group: this rank's pipeline :class:`~hvdllm.common.comm.Group`; its
            communicator is duplicated (collective over the group).
    """

    def __init__(self, group: Group):
        self.group = group
        with watchdog.current().waiting("pipeline set-up: duplicating the pp communicator",
                                        group.kind, group.ranks):
            self.comm = group.comm.Dup()
        self.tag_limit = _tag_upper_bound(self.comm)

    def stage_name(self, stage: int) -> str:
        return f"stage {stage} (global rank {self.group.ranks[stage]})"

    def describe(self, op: str, peer: int) -> str:
        return (f"pipeline {op} on {self.stage_name(self.group.rank)} from/to "
                f"{self.stage_name(peer)} after {self.group.timeout_sec:g}s")

    def poll(self, requests: list, what: str, deadline: float, op: str,
             peers: int | Sequence[int], nbytes: int = 0) -> None:
        """Wait for ``requests`` on this link (a flight-record event) until ``deadline``."""
        peers = [peers] if isinstance(peers, int) else peers
        wait_requests(requests, what, deadline, op=op, group=self.group,
                      peers=[self.group.ranks[p] for p in peers], nbytes=nbytes,
                      max_pause=1e-4)  # stage hand-offs are on the critical path

    def check_tags(self, largest: int) -> None:
        """Raise unless schedule tags up to ``largest`` fit this MPI's tag range."""
        if 2 * largest + 1 > self.tag_limit:
            raise PipelineCommError(
                f"pipeline messages need MPI tags up to {2 * largest + 1} but this MPI allows "
                f"{self.tag_limit}; use fewer micro-batches or stages per step")

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> SendHandle:
        """Post a send of ``tensor`` (detached) to pipeline stage ``peer``."""
        data = tensor.detach().contiguous()
        header = TensorSpec.of(data).encode()
        reqs = [self.comm.Isend(header, dest=peer, tag=2 * tag),
                self.comm.Isend(_raw_bytes(data), dest=peer, tag=2 * tag + 1)]
        return SendHandle(reqs, (header, data), self.describe(f"send of {what}", peer), self,
                          peer, f"pipeline send of {what}")

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
        sends = [self.comm.Isend(spec.encode(), dest=peer, tag=2 * tag)
                 for peer, tag, spec in outgoing]
        headers = [np.empty(_HEADER_LEN, np.int64) for _ in incoming]
        recvs = [self.comm.Irecv(buf, source=peer, tag=2 * tag)
                 for buf, (peer, tag, _, _) in zip(headers, incoming)]
        deadline = time.monotonic() + self.group.timeout_sec
        neighbours = sorted({peer for peer, _, _, _ in incoming} | {p for p, _, _ in outgoing})
        self.poll(recvs, f"pipeline set-up on {self.stage_name(self.group.rank)}: agreeing on "
                         f"message shapes with its neighbour stages after "
                         f"{self.group.timeout_sec:g}s", deadline,
                  "pipeline set-up: agreeing on message shapes", neighbours)
        for buf, (peer, _, spec, what) in zip(headers, incoming):
            got = TensorSpec.decode(buf)
            if got != spec:
                raise PipelineCommError(
                    f"pipeline set-up: {self.stage_name(self.group.rank)} expects {what} as "
                    f"{spec} but {self.stage_name(peer)} will send {got}")
        self.poll(sends, f"pipeline set-up sends on {self.stage_name(self.group.rank)}", deadline,
                  "pipeline set-up sends", neighbours)

    def exchange(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> torch.Tensor:
        """Send ``tensor`` to ``peer`` and return the same-spec tensor ``peer`` sends back."""
        recv = self.irecv(peer, tag, TensorSpec.of(tensor), what)
        send = self.isend(tensor, peer, tag, what)
        out = recv.wait()
        send.wait()
        return out

    def free(self) -> None:
        """Release the duplicated communicator."""
        self.comm.Free()


def _tag_upper_bound(comm: Any) -> int:
    from mpi4py import MPI

    value = comm.Get_attr(MPI.TAG_UB)
    return int(value) if value is not None else 32767
