"""Point-to-point messages with deadlines: one framing, one polling loop (numpy + mpi4py).

Every wait hvdllm posts on MPI requests goes through :func:`wait_requests`,
which polls until a deadline, records the wait in the flight record
(:mod:`hvdllm.common.watchdog`) and turns a missing peer into an error
naming the operation, the group and the ranks.

Every point-to-point message has the same framing.  A message with tag
``t`` travels as two MPI messages: a header (:class:`ArraySpec` encoded as
``int64``: dtype code, number of dimensions, the dimensions) on tag
``2 t`` and the raw payload bytes on tag ``2 t + 1``.  Two users:

* :meth:`hvdllm.common.comm.Group.isend` / :meth:`~hvdllm.common.comm.Group.recv`:
  self-describing messages, the receiver reads the header first;
* :class:`Link`: the messages between pipeline stages, whose specs the
  stages agree on once at set-up (:meth:`Link.agree`).  A receive then
  posts both of its MPI receives at once (the payload buffer has the agreed
  size), and :meth:`RecvHandle.wait` checks the header against the
  agreement before the payload is used, so a message that does not match
  is an error naming both stages, never garbage or a hang.

The framework adapters wrap :class:`Link` for their tensors
(:mod:`hvdllm.torch.pipeline.p2p`, :mod:`hvdllm.tensorflow.pipeline.p2p`);
here everything is a numpy buffer, moved as bytes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import watchdog
from .errors import CommError, CommTimeoutError

if TYPE_CHECKING:
    from .comm import Group

MAX_DIMS = 8
HEADER_LEN = 2 + MAX_DIMS
#: Wire codes of the dtypes a message may carry (position = code).
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
          "uint16", "uint32", "uint64", "complex64", "complex128", "bfloat16")
_CODE = {name: i for i, name in enumerate(DTYPES)}


class MessageError(CommError):
    """Two ranks disagree about a message (dtype, shape or layout), or it cannot be framed."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of wire dtype ``name`` (``bfloat16`` through ``ml_dtypes``)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class ArraySpec:
    """dtype (a name from :data:`DTYPES`) and shape of one message."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, array: np.ndarray) -> "ArraySpec":
        return cls(np.dtype(array.dtype).name, tuple(int(s) for s in array.shape))

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    @property
    def nbytes(self) -> int:
        itemsize = 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize
        return itemsize * math.prod(self.shape)

    def encode(self) -> np.ndarray:
        """The header of a message of this spec."""
        if self.dtype not in _CODE:
            raise MessageError(f"point-to-point messages cannot carry {self}; supported dtypes: "
                               f"{', '.join(DTYPES)}")
        if len(self.shape) > MAX_DIMS:
            raise MessageError(f"point-to-point messages carry at most {MAX_DIMS} dimensions, "
                               f"got {self}")
        header = np.zeros(HEADER_LEN, np.int64)
        header[0], header[1] = _CODE[self.dtype], len(self.shape)
        header[2:2 + len(self.shape)] = self.shape
        return header

    @classmethod
    def decode(cls, header: np.ndarray) -> "ArraySpec":
        code, ndim = int(header[0]), int(header[1])
        if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise MessageError(f"malformed point-to-point message header {header.tolist()}")
        return cls(DTYPES[code], tuple(int(s) for s in header[2:2 + ndim]))


def byte_view(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a flat ``uint8`` view (what MPI moves)."""
    if not array.flags.c_contiguous:
        raise ValueError("point-to-point buffers must be C-contiguous")
    return array.reshape(-1).view(np.uint8)


def wait_requests(requests: list, what: str, deadline: float, *, op: str = "",
                  group: "Group | None" = None, peers: Sequence[int] | None = None,
                  nbytes: int = 0, max_pause: float = 1e-3) -> None:
    """Poll MPI ``requests`` to completion with a short back-off, until ``deadline``.

    The wait is an event of the flight record (:mod:`hvdllm.common.watchdog`);
    past the deadline the running watchdog reports the hang and ends the
    job, or, without one, :class:`CommTimeoutError` (``what``) is raised.

    Args:
        requests: mpi4py requests.
        what: the full description for the error message.
        deadline: ``time.monotonic()`` value.
        op: short, rank-independent name of the operation (``what`` if empty).
        group: the group waited on (its kind and ranks are recorded).
        peers: global ranks waited for, when only some of the group's.
        nbytes: payload bytes, for the record.
        max_pause: longest sleep between polls (the back-off starts at 1 us).
    """
    from mpi4py import MPI

    wd = watchdog.current()
    event = wd.begin(op or what, group.kind if group is not None else "world",
                     group.ranks if group is not None else (), peers, nbytes)
    try:
        pause = 1e-6
        while not MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                for req in requests:
                    try:
                        req.Cancel()
                    except Exception:  # collectives cannot be cancelled
                        pass
                message = f"{what} timed out"
                wd.expired(event, message)
                raise CommTimeoutError(message)
            time.sleep(pause)
            pause = min(pause * 2, max_pause)
    finally:
        wd.end(event)


class SendHandle:
    """A posted send; keeps its buffers alive until the send completes."""

    def __init__(self, link: "Link", requests: list, keepalive: tuple, peer: int, what: str,
                 nbytes: int):
        self._link = link
        self._requests = requests
        self._keepalive = keepalive
        self._peer = peer
        self.what = what
        self._nbytes = nbytes

    def test(self) -> bool:
        """True once the send has completed (never blocks); frees the buffers then."""
        from mpi4py import MPI

        if self._keepalive and MPI.Request.Testall(self._requests):
            self._keepalive = ()
        return not self._keepalive

    def wait(self) -> None:
        if self._keepalive:
            link = self._link
            link.poll(self._requests, link.describe(f"send of {self.what}", self._peer),
                      time.monotonic() + link.group.timeout_sec,
                      f"{link.label} send of {self.what}", self._peer, self._nbytes)
            self._keepalive = ()


class RecvHandle:
    """A posted receive of an agreed spec into ``buffer``; :meth:`wait` returns the buffer."""

    def __init__(self, link: "Link", peer: int, tag: int, spec: ArraySpec, what: str,
                 buffer: np.ndarray):
        if buffer.nbytes != spec.nbytes:
            raise ValueError(f"receive buffer of {buffer.nbytes} bytes for {spec}")
        self._link = link
        self._peer = peer
        self.spec = spec
        self.what = what
        self.buffer = buffer
        self._header = np.empty(HEADER_LEN, np.int64)
        self._header_req = link.comm.Irecv(self._header, source=peer, tag=2 * tag)
        self._payload_req = link.comm.Irecv(byte_view(buffer), source=peer, tag=2 * tag + 1)

    def wait(self) -> np.ndarray:
        """The received buffer, after checking it is what the two ranks agreed on."""
        link = self._link
        deadline = time.monotonic() + link.group.timeout_sec
        link.poll([self._header_req], link.describe(f"receive of the header of {self.what}",
                                                    self._peer),
                  deadline, f"{link.label} recv of {self.what}", self._peer)
        got = ArraySpec.decode(self._header)
        if got != self.spec:
            try:
                self._payload_req.Cancel()
            except Exception:  # already matched: nothing left to cancel
                pass
            raise MessageError(
                f"{link.label} {self.what}: {link.member_name(link.group.rank)} expected "
                f"{self.spec} but {link.member_name(self._peer)} sent {got}")
        link.poll([self._payload_req], link.describe(f"receive of {self.what} ({got})",
                                                     self._peer),
                  deadline, f"{link.label} recv of {self.what} payload", self._peer,
                  self.buffer.nbytes)
        return self.buffer


class Link:
    """Framed, non-blocking messages between the ranks of one group, with agreed specs.

    The link runs on a private duplicate of the group's communicator, so no
    other traffic can ever match its tags.

    Args:
        group: the :class:`~hvdllm.common.comm.Group` (collective: its
            communicator is duplicated).
        label: how errors name the link ("pipeline").
        member: how errors name a rank of the group ("stage").
    """

    def __init__(self, group: "Group", label: str = "pipeline", member: str = "stage"):
        self.group = group
        self.label = label
        self.member = member
        with watchdog.current().waiting(f"{label} set-up: duplicating the {group.kind} "
                                        f"communicator", group.kind, group.ranks):
            self.comm = group.comm.Dup()
        self.tag_limit = _tag_upper_bound(self.comm)

    def member_name(self, rank: int) -> str:
        return f"{self.member} {rank} (global rank {self.group.ranks[rank]})"

    def describe(self, op: str, peer: int) -> str:
        return (f"{self.label} {op} on {self.member_name(self.group.rank)} from/to "
                f"{self.member_name(peer)} after {self.group.timeout_sec:g}s")

    def poll(self, requests: list, what: str, deadline: float, op: str,
             peers: int | Sequence[int], nbytes: int = 0) -> None:
        """Wait for ``requests`` on this link (a flight-record event) until ``deadline``."""
        peers = [peers] if isinstance(peers, int) else peers
        wait_requests(requests, what, deadline, op=op, group=self.group,
                      peers=[self.group.ranks[p] for p in peers], nbytes=nbytes,
                      max_pause=1e-4)  # stage hand-offs are on the critical path

    def check_tags(self, largest: int) -> None:
        """Raise unless message tags up to ``largest`` fit this MPI's tag range."""
        if 2 * largest + 1 > self.tag_limit:
            raise MessageError(
                f"{self.label} messages need MPI tags up to {2 * largest + 1} but this MPI "
                f"allows {self.tag_limit}; use fewer micro-batches or stages per step")

    def isend(self, array: np.ndarray, peer: int, tag: int, what: str,
              spec: ArraySpec | None = None, keepalive: tuple = ()) -> SendHandle:
        """Post a send of ``array`` to group rank ``peer``.

        Args:
            array: C-contiguous payload.
            peer: receiving rank in the group.
            tag: message tag (both ends use the same).
            what: what the message carries, for errors.
            spec: the spec announced in the header (default: the array's
                own; a raw byte view of a tensor passes its real spec).
            keepalive: more objects to keep alive until the send completes.
        """
        spec = spec or ArraySpec.of(array)
        if spec.nbytes != array.nbytes:
            raise ValueError(f"{self.label} send of {what}: {array.nbytes} bytes for {spec}")
        header = spec.encode()
        reqs = [self.comm.Isend(header, dest=peer, tag=2 * tag),
                self.comm.Isend(byte_view(array), dest=peer, tag=2 * tag + 1)]
        return SendHandle(self, reqs, (header, array) + tuple(keepalive), peer, what,
                          spec.nbytes)

    def irecv(self, peer: int, tag: int, spec: ArraySpec, what: str,
              buffer: np.ndarray | None = None) -> RecvHandle:
        """Post a receive of a ``spec`` message from group rank ``peer`` into ``buffer``.

        ``buffer`` (default: new bytes) must hold exactly ``spec.nbytes``.
        """
        if buffer is None:
            buffer = np.empty(spec.nbytes, np.uint8)
        return RecvHandle(self, peer, tag, spec, what, buffer)

    def agree(self, outgoing: Sequence[tuple[int, int, ArraySpec]],
              incoming: Sequence[tuple[int, int, ArraySpec, str]]) -> None:
        """Exchange the specs of every message a step will carry; fail on a mismatch.

        Args:
            outgoing: ``(peer, tag, spec)`` of each message this rank will send.
            incoming: ``(peer, tag, spec, what)`` of each message it expects.
        """
        sends = [self.comm.Isend(spec.encode(), dest=peer, tag=2 * tag)
                 for peer, tag, spec in outgoing]
        headers = [np.empty(HEADER_LEN, np.int64) for _ in incoming]
        recvs = [self.comm.Irecv(buf, source=peer, tag=2 * tag)
                 for buf, (peer, tag, _, _) in zip(headers, incoming)]
        deadline = time.monotonic() + self.group.timeout_sec
        neighbours = sorted({peer for peer, _, _, _ in incoming} | {p for p, _, _ in outgoing})
        me = self.member_name(self.group.rank)
        self.poll(recvs, f"{self.label} set-up on {me}: agreeing on message shapes with its "
                         f"neighbours after {self.group.timeout_sec:g}s", deadline,
                  f"{self.label} set-up: agreeing on message shapes", neighbours)
        for buf, (peer, _, spec, what) in zip(headers, incoming):
            got = ArraySpec.decode(buf)
            if got != spec:
                raise MessageError(f"{self.label} set-up: {me} expects {what} as {spec} but "
                                   f"{self.member_name(peer)} will send {got}")
        self.poll(sends, f"{self.label} set-up sends on {me}", deadline,
                  f"{self.label} set-up sends", neighbours)

    def exchange(self, array: np.ndarray, peer: int, tag: int, what: str,
                 spec: ArraySpec | None = None) -> np.ndarray:
        """Send ``array`` to ``peer``; return the same-spec bytes ``peer`` sends back."""
        spec = spec or ArraySpec.of(array)
        recv = self.irecv(peer, tag, spec, what, np.empty_like(array))
        send = self.isend(array, peer, tag, what, spec)
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
