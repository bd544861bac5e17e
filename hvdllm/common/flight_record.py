"""The flight record of a rank's communication, and the hang report built from it.

Pure bookkeeping, no MPI: :class:`FlightRecorder` keeps the last N
communication events of this rank (operation, group, tensor bytes, start
and end), and :func:`hang_report` turns one stuck event plus what the
heartbeats said about the peers (:class:`PeerState`) into

* the likeliest culprit: the rank everyone else waited for, by evidence
  in this order: a rank whose heartbeat stopped (frozen, dead or cut off),
  then a rank that is alive but has not entered any communication for a
  long time (stuck in its own code), and among those the group's own
  ranks first;
* the ranks that did not arrive at the stuck operation, when the
  heartbeats tell (peers that are waiting in the same operation of the
  same step arrived; the others did not);
* the printed block and the ``hang-rank-K.json`` record.

This is the idea of PyTorch's NCCL flight recorder, for MPI and Horovod.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


class CommEvent:
    """One communication call of this rank; ``end`` is None while it is pending."""

    __slots__ = ("seq", "op", "group", "ranks", "peers", "nbytes", "step", "micro", "start",
                 "end")

    def __init__(self, seq: int, op: str, group: str, ranks: tuple[int, ...],
                 peers: tuple[int, ...] | None, nbytes: int, step: int, micro: int | None,
                 start: float):
        self.seq = seq
        self.op = op
        self.group = group
        self.ranks = ranks
        self.peers = peers
        self.nbytes = nbytes
        self.step = step
        self.micro = micro
        self.start = start
        self.end: float | None = None

    def where(self) -> str:
        return position(self.step, self.micro)

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        out = {"seq": self.seq, "op": self.op, "group": self.group, "ranks": list(self.ranks),
               "bytes": self.nbytes, "step": self.step, "micro_batch": self.micro,
               "start": round(self.start + wall_offset, 6),
               "end": None if self.end is None else round(self.end + wall_offset, 6)}
        if self.peers is not None:
            out["peers"] = list(self.peers)
        return out


class FlightRecorder:
    """Ring buffer of the last ``capacity`` communication events.

    ``start``/``end`` are ``time.monotonic()`` values; records convert them
    to wall-clock seconds so that the files of different ranks line up.
    """

    def __init__(self, capacity: int = 256):
        self._events: collections.deque[CommEvent] = collections.deque(maxlen=max(1, capacity))
        self._seq = 0
        self.wall_offset = time.time() - time.monotonic()

    def begin(self, op: str, group: str, ranks: tuple[int, ...], peers: tuple[int, ...] | None,
              nbytes: int, step: int, micro: int | None, now: float) -> CommEvent:
        self._seq += 1
        event = CommEvent(self._seq, op, group, ranks, peers, nbytes, step, micro, now)
        self._events.append(event)
        return event

    def events(self) -> list[CommEvent]:
        return list(self._events)


@dataclass
class PeerState:
    """What the last heartbeat of one peer said, and when it came.

    Args:
        rank: the peer's global rank.
        heard_at: ``time.monotonic()`` when the heartbeat arrived.
        step: the peer's training step (0 = start-up).
        micro: its micro-batch, if known.
        waiting: its oldest pending wait, ``(op, group, ranks, seconds)``, or None.
        idle_sec: seconds since it last started or finished any communication.
        pid: its process id; host: its host name.
    """

    rank: int
    heard_at: float
    step: int = 0
    micro: int | None = None
    waiting: tuple[str, str, tuple[int, ...], float] | None = None
    idle_sec: float = 0.0
    pid: int = 0
    host: str = ""

    def describe(self, now: float) -> str:
        age = now - self.heard_at
        where = position(self.step, self.micro)
        if self.waiting is not None:
            op, group, ranks, secs = self.waiting
            doing = f"waiting {secs + age:.1f}s in {op} on {group} group {_ranks(ranks)}"
        else:
            doing = f"running its own code, no communication for {self.idle_sec + age:.1f}s"
        return f"rank {self.rank} ({where}): {doing}; last heartbeat {age:.1f}s ago"


@dataclass
class Culprit:
    rank: int | None
    reason: str
    evidence: str = ""


@dataclass
class HangReport:
    """Everything one rank can say about a hang it saw or was told of."""

    rank: int
    world_size: int
    event: CommEvent | None
    waited_sec: float
    culprit: Culprit
    not_arrived: list[int] | None
    peers: dict[int, PeerState] = field(default_factory=dict)

    def lines(self, now: float, record_path: str | None) -> list[str]:
        """The printed block; its first line names the likeliest culprit.

        Peers are listed when they belong to the stuck operation's group or
        are the culprit; the record has every peer.
        """
        c = self.culprit
        head = (f"[hvdllm] HANG: likeliest culprit rank {c.rank} ({c.reason})" if c.rank is not None
                else f"[hvdllm] HANG: culprit unknown ({c.reason})")
        out = [head]
        if self.event is not None:
            e = self.event
            out.append(f"[hvdllm]   rank {self.rank} waited {self.waited_sec:.1f}s in {e.op} "
                       f"on {e.group} group {_ranks(e.ranks)} at {e.where()}")
            if self.not_arrived is not None:
                missing = _ranks(self.not_arrived) if self.not_arrived else "none (all waiting)"
                out.append(f"[hvdllm]   ranks that did not arrive: {missing}")
            else:
                out.append(f"[hvdllm]   ranks that did not arrive: unknown (no heartbeats); "
                           f"the group is {_ranks(e.ranks)}")
        shown = set(self.event.ranks if self.event is not None else ()) | {c.rank}
        for peer in sorted(r for r in self.peers if r in shown):
            out.append(f"[hvdllm]   peer {self.peers[peer].describe(now)}")
        if record_path:
            out.append(f"[hvdllm]   flight record (last communication events): {record_path}")
        return out

    def record(self, now: float, wall_offset: float, events: Iterable[CommEvent],
               stacks: str, trigger: str) -> dict[str, Any]:
        """The JSON document written to ``hang-rank-K.json``."""
        c = self.culprit
        return {
            "culprit": {"rank": c.rank, "reason": c.reason, "evidence": c.evidence},
            "rank": self.rank,
            "world_size": self.world_size,
            "trigger": trigger,
            "time": round(now + wall_offset, 6),
            "waited_in": None if self.event is None else {
                **self.event.as_dict(wall_offset), "waited_sec": round(self.waited_sec, 3)},
            "not_arrived": self.not_arrived,
            "peers": {str(r): {"last_heartbeat_sec_ago": round(now - p.heard_at, 3),
                               "step": p.step, "micro_batch": p.micro,
                               "waiting": None if p.waiting is None else {
                                   "op": p.waiting[0], "group": p.waiting[1],
                                   "ranks": list(p.waiting[2]),
                                   "sec": round(p.waiting[3] + now - p.heard_at, 3)},
                               "idle_sec": round(p.idle_sec + now - p.heard_at, 3),
                               "pid": p.pid, "host": p.host}
                      for r, p in sorted(self.peers.items())},
            "events": [e.as_dict(wall_offset) for e in events],
            "stacks": stacks,
        }


def same_wait(event: CommEvent, peer: PeerState) -> bool:
    """True if ``peer`` is waiting in the same operation, group and step as ``event``."""
    if peer.waiting is None:
        return False
    op, group, ranks, _ = peer.waiting
    return (op, group, tuple(ranks), peer.step) == (event.op, event.group, event.ranks,
                                                    event.step)


def not_arrived(event: CommEvent, me: int, peers: dict[int, PeerState]) -> list[int] | None:
    """Ranks of ``event``'s group (or its named peers) not waiting in it; None if unknowable."""
    expected = [r for r in (event.peers or event.ranks) if r != me]
    if any(r not in peers for r in expected):
        return None
    return [r for r in expected if not same_wait(event, peers[r])]


def find_culprit(event: CommEvent | None, me: int, peers: dict[int, PeerState],
                 silent: Sequence[int], now: float, stale_sec: float) -> Culprit:
    """The rank the others most likely wait for, with the evidence.

    Args:
        event: the stuck wait of this rank (None when told of a hang by a peer).
        me: this rank.
        peers: the latest heartbeat of each peer heard from.
        silent: peers expected to send heartbeats that never did.
        now: ``time.monotonic()``.
        stale_sec: a heartbeat older than this means the peer stopped running.
    """
    group = [r for r in ((event.peers or event.ranks) if event is not None else ()) if r != me]
    in_group = {r: 0 if r in group else 1 for r in set(peers) | set(silent)}

    def order(ranks):
        return sorted(ranks, key=lambda r: (in_group.get(r, 1), r))

    for r in order(silent):
        return Culprit(r, "sent no heartbeat at all: never started, or unreachable")
    stale = [r for r, p in peers.items() if now - p.heard_at > stale_sec]
    if stale:
        r = max(stale, key=lambda r: (in_group[r] == 0, now - peers[r].heard_at))
        return Culprit(r, f"no heartbeat for {now - peers[r].heard_at:.1f}s: frozen, dead or "
                          f"cut off", peers[r].describe(now))
    busy = [r for r, p in peers.items() if p.waiting is None
            and p.idle_sec + (now - p.heard_at) > stale_sec]
    if busy:
        r = max(busy, key=lambda r: (in_group[r] == 0, peers[r].idle_sec - peers[r].heard_at))
        p = peers[r]
        return Culprit(r, f"alive, but has not communicated for {p.idle_sec + now - p.heard_at:.1f}s"
                          f": stuck in its own code", p.describe(now))
    if event is not None and not group:
        return Culprit(None, "this rank's group has no other rank")
    return Culprit(None, "every rank heard from is waiting too; compare the hang-rank-*.json "
                         "records" if peers else "no peer heartbeats (watchdog side channel off)")


def position(step: int, micro: int | None) -> str:
    """"step 7, micro-batch 3", "start-up" (step 0) or "after training" (step < 0)."""
    if step <= 0:
        return "start-up" if step == 0 else "after training"
    return f"step {step}" if micro is None else f"step {step}, micro-batch {micro}"


def _ranks(ranks: Iterable[int]) -> str:
    return "[" + ",".join(str(r) for r in ranks) + "]"
