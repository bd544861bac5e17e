"""A per-rank watchdog: no wait on another rank outlives the deadline.

Polling bounds the waits hvdllm posts itself (:mod:`hvdllm.common.comm`),
but not a wait inside a TensorFlow graph or inside Horovod: a frozen peer
stops Horovod's background thread inside MPI, so Horovod's own stall
inspector never runs.  The watchdog covers every wait the same way:

* **Heartbeat.** Each wait on other ranks is bracketed by
  :meth:`Watchdog.begin` / :meth:`Watchdog.end` (or :meth:`Watchdog.waiting`),
  and the training loop reports its step and micro-batch.  These are a few
  attribute writes and a ring-buffer append: the flight record.
* **Watchdog thread.** Twice a second it checks whether this rank has
  been inside a wait with nothing moving for ``timeout_sec``.  Time spent in
  the rank's own computation never counts, so a slow rank is not a dead
  one: only its peers, waiting on it, see their deadline pass.
* **Peer heartbeats.** Once a second (``timeout_sec / 10`` if shorter) the
  thread sends a small message with its step and its current wait to every
  other rank (above 64 ranks: to its dp, tp and pp peers), on ``MPI
  COMM_WORLD`` with a reserved tag, and keeps the latest from each.  A
  frozen rank goes quiet; a rank stuck in its own code keeps beating but
  never waits.  That is how a waiting rank names the culprit.
* **On the deadline** the rank prints one block (culprit first, then the
  operation, step, micro-batch and the ranks that did not arrive), dumps
  every thread's Python stack (``faulthandler``), writes its flight record
  to ``output_dir/hang-rank-K.json``, asks every live peer to write theirs
  (they answer within a second), and ends the job with ``MPI_Abort``.
* **Backstop.** If even the watchdog thread cannot run (a C call holding
  the GIL), ``faulthandler``'s own timer dumps the stacks and exits the
  process ``timeout_sec + 10`` seconds after the thread last checked in;
  the launcher then ends the job.

One watchdog runs per process (:func:`current`), like ``faulthandler``
itself; code that waits asks for it instead of threading it through every
call.  Without one, :func:`current` returns a no-op stand-in and polled
waits raise :class:`~hvdllm.common.errors.CommTimeoutError` as before.
"""
from __future__ import annotations

import atexit
import faulthandler
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .flight_record import (CommEvent, FlightRecorder, HangReport, PeerState, find_culprit,
                            not_arrived)

HEARTBEAT_TAG = 32_101        # on MPI_COMM_WORLD; below the MPI minimum tag bound of 32767
_MSG_BYTES = 4096
_CHECK_SEC = 0.5              # how often the watchdog thread looks (10/s cost 3% at dp=2)
_ACK_WAIT_SEC = 3.0           # how long a firing rank waits for peers to write their records
_BACKSTOP_SLACK_SEC = 10.0
_ALL_PEERS_UP_TO = 64         # larger worlds: heartbeats to dp, tp and pp peers only
ENV_TIMEOUT = "HVDLLM_TIMEOUT_SEC"
ENV_HANG_DIR = "HVDLLM_HANG_DIR"


def timeout_from_env(default: float) -> float:
    """``$HVDLLM_TIMEOUT_SEC`` if set (a positive number), else ``default``."""
    raw = os.environ.get(ENV_TIMEOUT)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        from .errors import ConfigError

        raise ConfigError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return value


# The step profiler (hvdllm.common.timeline) while one records: every wait's
# end is handed to it, so the timeline shows the waits the flight record has.
_profiler: Any = None


def set_profiler(profiler: Any) -> None:
    """Hand every finished wait to ``profiler.comm(op, group, nbytes, start, end)`` (None: stop)."""
    global _profiler
    _profiler = profiler


class _NullWatchdog:
    """Stand-in when no watchdog runs: every call is a no-op (but the profiler's)."""

    running = False
    step = 0

    def begin(self, op: str, group: str, ranks: Sequence[int], peers: Any = None,
              nbytes: int = 0) -> Any:
        if _profiler is not None:
            return (op, group, nbytes, time.monotonic())
        return None

    def end(self, event: Any) -> None:
        if event is not None and _profiler is not None:
            _profiler.comm(*event, time.monotonic())

    def waiting(self, op: str, group: str, ranks: Sequence[int], peers: Any = None,
                nbytes: int = 0) -> "_Wait":
        return _Wait(self, op, group, ranks, peers, nbytes)

    def set_step(self, step: int) -> None:
        return None

    def set_micro(self, micro: int | None) -> None:
        return None

    def expired(self, event: Any, message: str) -> None:
        return None


_NULL = _NullWatchdog()
_current: "Watchdog | None" = None


def current() -> "Watchdog | _NullWatchdog":
    """The running watchdog of this process, or a no-op stand-in."""
    return _current or _NULL


class _Wait:
    """Context manager: one wait in the flight record."""

    __slots__ = ("_wd", "_args", "event")

    def __init__(self, wd, op, group, ranks, peers, nbytes):
        self._wd = wd
        self._args = (op, group, ranks, peers, nbytes)
        self.event = None

    def __enter__(self) -> "_Wait":
        self.event = self._wd.begin(*self._args)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._wd.end(self.event)


class Watchdog:
    """Bounds every registered wait of this rank; see the module docstring.

    Args:
        comm: ``MPI.COMM_WORLD`` (mpi4py); heartbeats use it with a reserved tag.
        timeout_sec: how long a wait may see nothing move.
        output_dir: where ``hang-rank-K.json`` goes (``$HVDLLM_HANG_DIR``, else
            the working directory, if None).
        history: communication events kept in the flight record.
        neighbours: the ranks this one communicates with (its dp, tp and pp
            peers).  Heartbeats go to every rank up to 64 ranks, and beyond
            that to the neighbours only (the two ring neighbours if None).
    """

    def __init__(self, comm: Any, timeout_sec: float, *, output_dir: str | os.PathLike | None = None,
                 history: int = 256, neighbours: Iterable[int] | None = None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout_sec = float(timeout_sec)
        self.output_dir = Path(output_dir or os.environ.get(ENV_HANG_DIR) or ".")
        self.recorder = FlightRecorder(history)
        self.beat_sec = min(1.0, self.timeout_sec / 10)
        self.stale_sec = min(max(5 * self.beat_sec, 3.0), self.timeout_sec / 2)
        if self.size <= _ALL_PEERS_UP_TO:
            peers: Iterable[int] = range(self.size)
        elif neighbours is not None:
            peers = neighbours
        else:
            peers = ((self.rank - 1) % self.size, (self.rank + 1) % self.size)
        self.peers = sorted(set(int(p) for p in peers) - {self.rank})
        self.step = 0
        self.micro: int | None = None
        self.running = False
        self._open: dict[int, CommEvent] = {}
        self._progress_at = time.monotonic()
        self._activity_at = self._progress_at
        self._peer_state: dict[int, PeerState] = {}
        self._fire_request: tuple[CommEvent | None, str] | None = None
        self._fired = False       # this rank is reporting a hang and ending the job
        self._recorded = False    # this rank's hang record is written
        self._acks: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recvs: list = []
        self._recv_bufs: list[np.ndarray] = []
        self._beat_sends: dict[int, tuple[Any, np.ndarray]] = {}
        self._other_sends: list[tuple[Any, np.ndarray]] = []
        self._host = socket.gethostname()

    # -- the training path (cheap) -------------------------------------------
    def begin(self, op: str, group: str, ranks: Sequence[int], peers: Sequence[int] | None = None,
              nbytes: int = 0) -> CommEvent:
        """Record the start of a wait on other ranks; pass the result to :meth:`end`."""
        now = time.monotonic()
        event = self.recorder.begin(op, group, tuple(ranks), None if peers is None else tuple(peers),
                                    int(nbytes), self.step, self.micro, now)
        self._open[event.seq] = event
        self._progress_at = self._activity_at = now
        return event

    def end(self, event: CommEvent | None) -> None:
        """Record that ``event``'s wait is over (completed or failed)."""
        if event is None:
            return
        now = time.monotonic()
        event.end = now
        self._open.pop(event.seq, None)
        self._progress_at = self._activity_at = now
        if _profiler is not None:
            _profiler.comm(event.op, event.group, event.nbytes, event.start, now)

    def waiting(self, op: str, group: str, ranks: Sequence[int],
                peers: Sequence[int] | None = None, nbytes: int = 0) -> _Wait:
        """``with watchdog.waiting(...):`` around a blocking call."""
        return _Wait(self, op, group, ranks, peers, nbytes)

    def set_step(self, step: int) -> None:
        """The training loop starts optimizer step ``step`` (1-based; 0 = start-up)."""
        self.step, self.micro = step, None
        self._progress_at = time.monotonic()

    def set_micro(self, micro: int | None) -> None:
        """The engine starts micro-batch ``micro`` (0-based, as in pipeline messages)."""
        self.micro = micro

    def expired(self, event: CommEvent | None, message: str) -> None:
        """A polled wait passed its deadline: report and end the job (does not return).

        The watchdog thread does the reporting; if it cannot within a few
        seconds, this returns and the caller raises its timeout error.
        """
        if not self.running:
            return
        self._fire_request = (event, message)
        self._stop.wait(_ACK_WAIT_SEC + 5.0)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Watchdog":
        """Start the thread and the heartbeats; become :func:`current`."""
        global _current
        if self.running:
            return self
        from mpi4py import MPI

        if self.peers and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            if self.rank == 0:
                sys.stderr.write("[hvdllm] warning: MPI lacks MPI_THREAD_MULTIPLE; the hang "
                                 "watchdog runs without peer heartbeats\n")
            self.peers = []
        for peer in self.peers:
            buf = np.zeros(_MSG_BYTES, np.uint8)
            self._recv_bufs.append(buf)
            self._recvs.append(self.comm.Irecv(buf, source=peer, tag=HEARTBEAT_TAG))
        self.running = True
        _current = self
        atexit.register(self.stop)  # before MPI is finalized: no MPI calls after that
        self._arm_backstop()
        self._thread = threading.Thread(target=self._run, name="hvdllm-watchdog", daemon=True)
        self._thread.start()
        return self

    def restart(self) -> None:
        """Stop and start again, keeping the flight record.

        Measured: a watchdog thread that runs while Horovod starts its own
        background thread costs about 3% of every later dp=2 torch step
        (``benchmarks/watchdog_overhead.py``); one started afterwards costs
        nothing measurable.  So the start-up watchdog is restarted once
        Horovod runs.
        """
        self.stop()
        self._stop.clear()
        self._recv_bufs.clear()
        self._fire_request = None
        self.start()

    def stop(self) -> None:
        """Stop the thread and the heartbeats (no more messages leave this rank)."""
        global _current
        if not self.running:
            return
        self.running = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        faulthandler.cancel_dump_traceback_later()
        for req in self._recvs:
            try:
                req.Cancel()
                req.Wait()
            except Exception:  # already complete: nothing to cancel
                pass
        self._recvs.clear()
        if _current is self:
            _current = None

    # -- the watchdog thread --------------------------------------------------
    def _run(self) -> None:
        next_beat = next_backstop = 0.0
        while not self._stop.wait(_CHECK_SEC):
            now = time.monotonic()
            if self.peers:
                try:
                    self._receive(now)
                    if now >= next_beat:
                        self._send_beats(now)
                        next_beat = now + self.beat_sec
                except Exception as exc:  # never let the side channel end a healthy job
                    sys.stderr.write(f"[hvdllm] warning: rank {self.rank}: hang watchdog "
                                     f"heartbeats stopped ({exc}); local deadlines still hold\n")
                    self.peers = []
            if now >= next_backstop:
                self._arm_backstop()  # restarts a C thread: not on every check
                next_backstop = now + min(30.0, (self.timeout_sec + _BACKSTOP_SLACK_SEC) / 3)
            request = self._fire_request
            if request is not None:
                self._fire(request[0], request[1])
            else:
                open_waits = list(self._open.values())
                if open_waits and now - self._progress_at > self.timeout_sec:
                    oldest = min(open_waits, key=lambda e: e.start)
                    self._fire(oldest, f"no progress for {now - self._progress_at:.1f}s "
                                       f"(deadline {self.timeout_sec:g}s)")

    def _arm_backstop(self) -> None:
        faulthandler.dump_traceback_later(self.timeout_sec + _BACKSTOP_SLACK_SEC, exit=True)

    def _message(self, kind: str, now: float, **extra: Any) -> np.ndarray:
        open_waits = list(self._open.values())
        wait = None
        if open_waits:
            e = min(open_waits, key=lambda e: e.start)
            wait = [e.op[:300], e.group, list(e.ranks), round(now - e.start, 3)]
        body = {"k": kind, "s": self.step, "m": self.micro, "w": wait,
                "i": round(now - self._activity_at, 3), "p": os.getpid(), "h": self._host, **extra}
        raw = json.dumps(body).encode()
        if len(raw) > _MSG_BYTES:  # a huge group: drop the rank list rather than the message
            body["w"] = wait and wait[:2] + [[], wait[3]]
            raw = json.dumps(body).encode()[:_MSG_BYTES]
        buf = np.zeros(_MSG_BYTES, np.uint8)
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        return buf

    def _send_beats(self, now: float) -> None:
        buf = self._message("beat", now)
        for peer in self.peers:
            pending = self._beat_sends.get(peer)
            if pending is not None and not pending[0].Test():
                continue  # the peer has not taken the last one: do not pile up
            self._beat_sends[peer] = (self.comm.Isend(buf, dest=peer, tag=HEARTBEAT_TAG), buf)

    def _send_all(self, kind: str, now: float, ranks: Iterable[int], **extra: Any) -> None:
        buf = self._message(kind, now, **extra)
        self._other_sends = [(r, b) for r, b in self._other_sends if not r.Test()]
        for peer in ranks:
            self._other_sends.append((self.comm.Isend(buf, dest=peer, tag=HEARTBEAT_TAG), buf))

    def _receive(self, now: float) -> None:
        from mpi4py import MPI

        done = MPI.Request.Testsome(self._recvs)
        for i in done or ():
            peer = self.peers[i]
            raw = self._recv_bufs[i].tobytes().rstrip(b"\0")
            self._recvs[i] = self.comm.Irecv(self._recv_bufs[i], source=peer, tag=HEARTBEAT_TAG)
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            wait = msg.get("w")
            self._peer_state[peer] = PeerState(
                rank=peer, heard_at=now, step=int(msg.get("s", 0)), micro=msg.get("m"),
                waiting=None if not wait else (wait[0], wait[1], tuple(wait[2]), float(wait[3])),
                idle_sec=float(msg.get("i", 0.0)), pid=int(msg.get("p", 0)),
                host=str(msg.get("h", "")))
            if msg.get("k") == "dump":
                self._on_dump(peer, msg.get("culprit"), msg.get("reason", ""), now)
            elif msg.get("k") == "ack":
                self._acks.add(peer)

    # -- firing ----------------------------------------------------------------
    def _report(self, event: CommEvent | None, now: float) -> HangReport:
        peers = dict(self._peer_state)
        silent = [p for p in self.peers if p not in peers]
        culprit = find_culprit(event, self.rank, peers, silent, now, self.stale_sec)
        return HangReport(rank=self.rank, world_size=self.size, event=event,
                          waited_sec=0.0 if event is None else now - event.start,
                          culprit=culprit,
                          not_arrived=None if event is None else not_arrived(event, self.rank,
                                                                             peers),
                          peers=peers)

    def _write_record(self, report: HangReport, now: float, stacks: str, trigger: str) -> str:
        path = self.output_dir / f"hang-rank-{self.rank}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = report.record(now, self.recorder.wall_offset, self.recorder.events(), stacks,
                                trigger)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            return f"(not written: {exc})"
        return str(path)

    def _fire(self, event: CommEvent | None, trigger: str) -> None:
        """Report the hang, collect the peers' records, end the job."""
        if self._fired:
            return
        self._fired = self._recorded = True
        now = time.monotonic()
        report = self._report(event, now)
        stacks = thread_stacks()
        path = self._write_record(report, now, stacks, trigger)
        lines = report.lines(now, path)
        lines.insert(1, f"[hvdllm]   rank {self.rank}: {trigger}")
        sys.stderr.write("\n".join(lines) + f"\n[hvdllm]   Python stacks of rank {self.rank}:\n"
                         + stacks)
        sys.stderr.flush()
        live = [p for p, s in self._peer_state.items() if now - s.heard_at <= self.stale_sec]
        if self.peers:
            try:
                self._send_all("dump", now, self.peers, culprit=report.culprit.rank,
                               reason=report.culprit.reason)
                deadline = time.monotonic() + _ACK_WAIT_SEC
                while not set(live) <= self._acks and time.monotonic() < deadline:
                    time.sleep(0.02)
                    self._receive(time.monotonic())
            except Exception as exc:  # the report above is what matters; still abort
                sys.stderr.write(f"[hvdllm]   (could not reach the peers: {exc})\n")
        sys.stderr.write(f"[hvdllm] rank {self.rank}: ending the job (MPI_Abort)\n")
        sys.stderr.flush()
        sys.stdout.flush()
        faulthandler.dump_traceback_later(_BACKSTOP_SLACK_SEC, exit=True)  # if Abort hangs
        self.comm.Abort(1)

    def _on_dump(self, sender: int, culprit: int | None, reason: str, now: float) -> None:
        """A peer saw a hang: write this rank's record (once) and acknowledge."""
        if not self._recorded:
            self._recorded = True
            open_waits = list(self._open.values())
            event = min(open_waits, key=lambda e: e.start) if open_waits else None
            report = self._report(event, now)
            stacks = thread_stacks()
            trigger = f"rank {sender} detected a hang (culprit {culprit}: {reason})"
            path = self._write_record(report, now, stacks, trigger)
            text = f"[hvdllm] rank {self.rank}: {trigger}; flight record {path}\n"
            if culprit == self.rank:
                text += f"[hvdllm]   rank {self.rank} is the likeliest culprit; its Python stacks:\n"
                text += stacks
            sys.stderr.write(text)
            sys.stderr.flush()
        self._send_all("ack", now, [sender])


def thread_stacks() -> str:
    """Every thread's Python stack, as ``faulthandler`` prints it."""
    with tempfile.TemporaryFile(mode="w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def wait_horovod(hvd: Any, handle: Any, op: str, group: Any, nbytes: int = 0) -> Any:
    """``hvd.synchronize(handle)`` as a registered wait of ``group`` (an hvdllm Group)."""
    wd = current()
    event = wd.begin(op, group.kind, group.ranks, None, nbytes)
    try:
        return hvd.synchronize(handle)
    finally:
        wd.end(event)
