"""Collectives and point-to-point messages over one group, with deadlines.

A :class:`Group` wraps an mpi4py communicator for a dp, tp, pp or world
group (see :mod:`hvdllm.common.topology`) and, where the framework adapter
made one, the Horovod process set over the same ranks.  The numpy methods
here carry control traffic and framework-free algorithms; the adapters use
the Horovod process set for gradients.

Every blocking call is posted non-blocking and then polled until a deadline.
A peer that never shows up becomes a :class:`CommTimeoutError` naming the
operation, the group and the ranks, instead of a hang.

Point-to-point messages use the framing of :mod:`hvdllm.common.p2p` (a
small header with dtype and shape ahead of the payload), so a receiver that
expects a different shape or dtype fails with an error naming both ranks
rather than reading garbage or blocking forever.  Every wait, collective or
point-to-point, is :func:`~hvdllm.common.p2p.wait_requests`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from .errors import CommError
# wait_requests is imported from here by callers that wait on their own requests.
from .p2p import (HEADER_LEN, ArraySpec, MessageError, byte_view, numpy_dtype,  # noqa: F401
                  wait_requests)

_REDUCE_OPS = ("sum", "mean", "max", "min", "prod")


def _mpi():
    from mpi4py import MPI

    return MPI


def _describe(dtype: Any, shape: Sequence[int]) -> str:
    return f"{np.dtype(dtype).name}[{','.join(str(int(s)) for s in shape)}]"


class PendingOp:
    """A posted non-blocking operation whose completion has a deadline.

    Args:
        requests: mpi4py requests.
        what: description for the timeout error.
        deadline: ``time.monotonic()`` value.
        on_done: called once on completion; its result is :meth:`wait`'s.
        keepalive: buffers MPI reads from until completion.
        op, group, peers, nbytes: how the wait appears in the flight record
            (see :func:`wait_requests`).
    """

    def __init__(self, requests: list, what: str, deadline: float, on_done=None,
                 keepalive: tuple = (), *, op: str = "", group: "Group | None" = None,
                 peers: Sequence[int] | None = None, nbytes: int = 0):
        self._requests = requests
        self._keepalive = keepalive
        self._what = what
        self._deadline = deadline
        self._on_done = on_done
        self._record = (op, group, peers, nbytes)
        self._done = False
        self._result = None

    def test(self) -> bool:
        """True once every request has completed (never blocks)."""
        if not self._done:
            MPI = _mpi()
            if MPI.Request.Testall(self._requests):
                self._finish()
        return self._done

    def _finish(self) -> None:
        self._done = True
        if self._on_done is not None:
            self._result = self._on_done()

    def wait(self) -> Any:
        """Block until done or the deadline; return the operation's result."""
        if not self._done:
            op, group, peers, nbytes = self._record
            wait_requests(self._requests, self._what, self._deadline, op=op, group=group,
                          peers=peers, nbytes=nbytes)
            self._finish()
        return self._result


class Group:
    """One communication group: an mpi4py communicator plus a Horovod process set.

    Args:
        kind: "world", "dp", "tp" or "pp" (used in error messages).
        comm: mpi4py intracommunicator of exactly these ranks.
        ranks: the global ranks of the group, ordered by group rank.
        timeout_sec: deadline of every blocking call.
        process_set: Horovod process set over the same ranks, if any.
    """

    def __init__(self, kind: str, comm: Any, ranks: Sequence[int], *, timeout_sec: float,
                 process_set: Any = None):
        if comm.Get_size() != len(ranks):
            raise CommError(
                f"{kind} group: communicator has {comm.Get_size()} ranks but {len(ranks)} were given"
            )
        self.kind = kind
        self.comm = comm
        self.ranks = tuple(int(r) for r in ranks)
        self.timeout_sec = float(timeout_sec)
        self.process_set = process_set

    # -- identity ----------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's rank inside the group."""
        return self.comm.Get_rank()

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    def __repr__(self) -> str:
        return f"Group({self.kind}, ranks={list(self.ranks)}, rank={self.rank})"

    def _what(self, op: str, peers: Sequence[int] | None = None) -> str:
        peers_txt = ""
        if peers is not None:
            peers_txt = " with global rank(s) " + ",".join(str(self.ranks[p]) for p in peers)
        return (f"{op} on {self.kind} group {list(self.ranks)} (global rank "
                f"{self.global_rank}{peers_txt}) after {self.timeout_sec:g}s")

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout_sec

    def pending(self, requests: list, op: str, peers: Sequence[int] | None = None,
                nbytes: int = 0, keepalive: tuple = ()) -> PendingOp:
        """A :class:`PendingOp` on this group with its deadline and flight-record entry.

        Args:
            requests: mpi4py requests on this group's communicator.
            op: what is waited for, e.g. "allreduce(sum) of float32[4]".
            peers: group ranks waited for, when only some (point-to-point).
            nbytes: payload bytes.
            keepalive: buffers to keep alive until completion.
        """
        global_peers = None if peers is None else [self.ranks[p] for p in peers]
        return PendingOp(requests, self._what(op, peers), self._deadline(), keepalive=keepalive,
                         op=op, group=self, peers=global_peers, nbytes=nbytes)

    # -- collectives -------------------------------------------------------
    def barrier(self) -> None:
        self.pending([self.comm.Ibarrier()], "barrier").wait()

    def allreduce(self, array: Any, op: str = "sum") -> np.ndarray:
        """Reduce ``array`` element-wise over the group; every rank gets the result."""
        if op not in _REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}; expected one of {_REDUCE_OPS}")
        send = np.ascontiguousarray(array)
        recv = np.empty_like(send)
        MPI = _mpi()
        mpi_op = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN,
                  "prod": MPI.PROD}[op]
        req = self.comm.Iallreduce(send, recv, op=mpi_op)
        self.pending([req], f"allreduce({op}) of {_describe(send.dtype, send.shape)}",
                     nbytes=send.nbytes).wait()
        if op == "mean":
            recv = recv / self.size if np.issubdtype(recv.dtype, np.floating) else recv // self.size
        return recv

    def allgather(self, array: Any) -> np.ndarray:
        """Gather equal-shaped arrays from every rank; result has a new leading axis."""
        send = np.ascontiguousarray(array)
        recv = np.empty((self.size,) + send.shape, dtype=send.dtype)
        req = self.comm.Iallgather(send, recv)
        self.pending([req], f"allgather of {_describe(send.dtype, send.shape)}",
                     nbytes=send.nbytes).wait()
        return recv

    def broadcast(self, array: Any, root: int = 0) -> np.ndarray:
        """Return ``root``'s array (``root`` is a rank inside the group) on every rank."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside {self.kind} group of size {self.size}")
        buf = np.array(array, copy=True, order="C")
        req = self.comm.Ibcast(buf, root=root)
        self.pending([req], f"broadcast of {_describe(buf.dtype, buf.shape)} from group rank "
                            f"{root}", nbytes=buf.nbytes).wait()
        return buf

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a picklable object; the root's copy is returned everywhere."""
        import pickle

        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if self.rank == root else None
        size = self.broadcast(np.array([0 if payload is None else payload.size], np.int64), root)
        buf = payload if payload is not None else np.empty(int(size[0]), np.uint8)
        return pickle.loads(self.broadcast(buf, root).tobytes())

    def reduce_scatter(self, array: Any, op: str = "sum") -> np.ndarray:
        """Reduce over the group and give each rank its equal slice of the leading axis."""
        send = np.ascontiguousarray(array)
        if send.ndim == 0 or send.shape[0] % self.size:
            raise CommError(
                f"reduce_scatter on {self.kind} group: leading dimension of shape "
                f"{tuple(send.shape)} is not divisible by the group size {self.size}"
            )
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"unknown reduce op {op!r}")
        MPI = _mpi()
        mpi_op = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        recv = np.empty((send.shape[0] // self.size,) + send.shape[1:], dtype=send.dtype)
        req = self.comm.Ireduce_scatter_block(send, recv, op=mpi_op)
        self.pending([req], f"reduce_scatter({op}) of {_describe(send.dtype, send.shape)}",
                     nbytes=send.nbytes).wait()
        if op == "mean":
            recv = recv / self.size
        return recv

    # -- point-to-point ----------------------------------------------------
    def _check_peer(self, peer: int, op: str) -> None:
        if not 0 <= peer < self.size:
            raise ValueError(f"{op}: peer {peer} outside {self.kind} group of size {self.size}")
        if peer == self.rank:
            raise ValueError(f"{op}: peer {peer} is this rank")

    def isend(self, array: Any, dest: int, tag: int = 0) -> PendingOp:
        """Post a send of ``array`` to group rank ``dest``; ``.wait()`` completes it."""
        self._check_peer(dest, "send")
        data = np.ascontiguousarray(array)
        spec = ArraySpec.of(data)
        try:
            header = spec.encode()
        except MessageError as exc:
            raise CommError(f"send on {self.kind} group: {exc}") from None
        reqs = [self.comm.Isend(header, dest=dest, tag=2 * tag),
                self.comm.Isend(byte_view(data), dest=dest, tag=2 * tag + 1)]
        return self.pending(reqs, f"send of {spec} (tag {tag})", [dest], data.nbytes,
                            keepalive=(header, data))

    def send(self, array: Any, dest: int, tag: int = 0) -> None:
        self.isend(array, dest, tag).wait()

    def recv(self, source: int, tag: int = 0, *, shape: Sequence[int] | None = None,
             dtype: Any = None) -> np.ndarray:
        """Receive an array from group rank ``source``.

        If ``shape`` or ``dtype`` is given, the sender's must match, or a
        :class:`CommError` names both ranks and both descriptions.
        """
        self._check_peer(source, "recv")
        header = np.empty(HEADER_LEN, np.int64)
        self.pending([self.comm.Irecv(header, source=source, tag=2 * tag)],
                     f"recv (tag {tag}) header", [source]).wait()
        try:
            got = ArraySpec.decode(header)
        except MessageError:
            raise CommError(f"recv on {self.kind} group: malformed header from global rank "
                            f"{self.ranks[source]} (tag {tag})") from None
        want = ArraySpec(got.dtype if dtype is None else np.dtype(dtype).name,
                         got.shape if shape is None else tuple(int(s) for s in shape))
        if want != got:
            # Drain the payload so the sender is not left blocked, then fail.
            junk = np.empty(got.nbytes, np.uint8)
            self.pending([self.comm.Irecv(junk, source=source, tag=2 * tag + 1)],
                         "recv payload", [source]).wait()
            raise CommError(
                f"recv on {self.kind} group (tag {tag}): global rank {self.global_rank} expected "
                f"{want} but global rank {self.ranks[source]} sent {got}"
            )
        out = np.empty(got.shape, numpy_dtype(got.dtype))
        self.pending([self.comm.Irecv(byte_view(out), source=source, tag=2 * tag + 1)],
                     f"recv of {got} (tag {tag})", [source], out.nbytes).wait()
        return out
