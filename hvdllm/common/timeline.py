"""Per-rank step profiles and their merge into one Chrome-trace / Perfetto timeline.

Recording (``train.profile_steps = [first, last]``): each rank keeps a
:class:`Profiler` that, during optimizer steps ``first..last``, notes when
every phase ran: ``step``, ``forward`` and ``backward`` of each micro-batch
(and chunk, in a pipeline), ``grad sync``, ``optimizer``, ``checkpoint
staging``, and every wait on other ranks.  The waits come from the hang
watchdog's flight record (:mod:`hvdllm.common.watchdog`), which already
brackets every collective, send and receive; so the timeline shows what
the hang report would name; pipeline sends and receives are also marked
where they are posted.  After the last profiled step each rank writes
``output.dir/profile/rank-K.json``.

Clocks: at start-up every rank measures its monotonic clock's offset to
rank 0's with a few ping-pongs (the one with the shortest round trip wins,
as NTP does), so ranks on different hosts line up to within half a round
trip.

Merging (``hvdllm timeline RUN_DIR``, :func:`merge_run`): one trace, one
process row per rank (compute on one track, waits on another), Horovod's
own timeline beside them when ``train.horovod_timeline`` recorded one, and
a per-rank summary:

* compute: time inside compute phases, less the waits nested in them;
* exposed communication: time waiting on other ranks (the union of waits);
* bubble: for a pipeline, the share of the step spent waiting on pipeline
  receives or idle, next to the schedule simulator's figure for the same
  schedule with the measured forward/backward cost ratio;
* idle: step time in no phase at all (Python, data, the loop).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

PROFILE_DIR = "profile"
HOROVOD_TIMELINE_FILE = "horovod_timeline.json"
COMPUTE_PHASES = ("forward", "backward", "optimizer", "grad sync", "checkpoint staging")


class _NullProfiler:
    """Stand-in when nothing is profiled: every call is a no-op."""

    active = False
    _null = contextlib.nullcontext()

    def span(self, name: str, **args: Any) -> contextlib.AbstractContextManager:
        return self._null

    def comm(self, op: str, group: str, nbytes: int, start: float, end: float) -> None:
        return None

    def at_step(self, step: int) -> None:
        return None

    def mark(self, name: str, **args: Any) -> None:
        return None

    def finish(self) -> None:
        return None


_NULL = _NullProfiler()
_current: "Profiler | None" = None


def current() -> "Profiler | _NullProfiler":
    """This process's profiler (a no-op stand-in when none records)."""
    return _current or _NULL


class _Span:
    __slots__ = ("_prof", "_name", "_args", "_start")

    def __init__(self, prof: "Profiler", name: str, args: dict):
        self._prof, self._name, self._args = prof, name, args

    def __enter__(self) -> "_Span":
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof._add(self._name, "compute", self._start, time.monotonic(), self._args)


class Profiler:
    """Records this rank's phases during steps ``first..last`` (see the module docstring).

    Args:
        rank: world rank.
        first, last: the profiled optimizer steps (1-based, inclusive).
        out_dir: the run's ``output.dir``; the profile goes to ``profile/rank-K.json``.
        clock_offset: seconds to add to this rank's ``time.monotonic()`` to get rank 0's.
        meta: layout facts for the merge (world, coords, schedule, ...).
    """

    def __init__(self, rank: int, first: int, last: int, out_dir: str | os.PathLike,
                 clock_offset: float, meta: dict[str, Any]):
        self.rank = rank
        self.first, self.last = first, last
        self.path = Path(out_dir) / PROFILE_DIR / f"rank-{rank}.json"
        self.clock_offset = clock_offset
        self.meta = meta
        self.active = False
        self.events: list[tuple[str, str, float, float, dict]] = []
        self._lock = threading.Lock()
        self._written = False
        self._step_start: float | None = None
        self._step = 0

    def install(self) -> "Profiler":
        """Make this the process's profiler (and the watchdog's comm hook)."""
        global _current
        from . import watchdog

        _current = self
        watchdog.set_profiler(self)
        return self

    def uninstall(self) -> None:
        global _current
        from . import watchdog

        if _current is self:
            _current = None
        watchdog.set_profiler(None)

    def _add(self, name: str, cat: str, start: float, end: float, args: dict) -> None:
        if self.active:
            with self._lock:
                self.events.append((name, cat, start, end, args))

    def span(self, name: str, **args: Any) -> contextlib.AbstractContextManager:
        """``with profiler.span("forward", mb=0):`` around a compute phase."""
        if not self.active:
            return _NULL._null
        return _Span(self, name, args)

    def comm(self, op: str, group: str, nbytes: int, start: float, end: float) -> None:
        """One wait on other ranks (from the watchdog)."""
        if self.active:
            self._add(op, f"wait:{group}", start, end, {"bytes": int(nbytes)} if nbytes else {})

    def mark(self, name: str, **args: Any) -> None:
        """An instant: a non-blocking send or receive posted (its wait, if any, is a span)."""
        if self.active:
            now = time.monotonic()
            self._add(name, "post", now, now, args)

    def at_step(self, step: int) -> None:
        """The loop starts optimizer step ``step`` (0 after the last one)."""
        now = time.monotonic()
        if self.active and self._step_start is not None:
            self._add("step", "step", self._step_start, now, {"step": self._step})
        self._step_start = None
        if self.first <= step <= self.last:
            self.active = True
            self._step, self._step_start = step, now
        elif self.active:
            self.active = False
            self.write()

    def finish(self) -> None:
        """The run ends: close an open step and write the profile if not yet written."""
        self.at_step(0)
        if not self._written and self.events:
            self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = dict(self.meta, rank=self.rank, host=socket.gethostname(),
                    clock_offset=self.clock_offset, steps=[self.first, self.last],
                    events=[[n, c, s, e, a] for n, c, s, e, a in self.events])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)
        self._written = True


def align_clocks(comm: Any, rounds: int = 8) -> float:
    """Seconds to add to this rank's ``time.monotonic()`` to read rank 0's clock.

    Collective over ``comm``; rank 0 answers each other rank's pings in turn.
    """
    from . import watchdog

    rank, size = comm.Get_rank(), comm.Get_size()
    tag = 0x7E11
    offset = 0.0
    with watchdog.current().waiting("timeline clock alignment", "world", tuple(range(size))):
        if rank == 0:
            for peer in range(1, size):
                for _ in range(rounds):
                    comm.recv(source=peer, tag=tag)
                    comm.send(time.monotonic(), dest=peer, tag=tag)
        else:
            best = None
            for _ in range(rounds):
                t1 = time.monotonic()
                comm.send(None, dest=0, tag=tag)
                remote = comm.recv(source=0, tag=tag)
                t2 = time.monotonic()
                if best is None or t2 - t1 < best[0]:
                    best = (t2 - t1, remote - (t1 + t2) / 2)
            offset = best[1]
        comm.Barrier()
    return offset


# --------------------------------------------------------------------------- merge

def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(intervals: Iterable[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the union ``a`` less its overlap with the union ``b``."""
    overlap = 0.0
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            overlap += min(e, b[k][1]) - max(s, b[k][0])
            k += 1
    return _length(a) - overlap


@dataclass
class RankSummary:
    rank: int
    coords: tuple[int, int, int]
    step_time: float
    compute: float
    exposed_comm: float
    idle: float
    bubble: float | None
    simulated_bubble: float | None


def _read_profiles(run_dir: Path) -> list[dict]:
    from .errors import ConfigError

    folder = run_dir / PROFILE_DIR
    files = sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise ConfigError(f"no profiles in {folder}: run with train.profile_steps = "
                          f"[first, last] (output.dir = {run_dir})")
    profiles = [json.loads(f.read_text()) for f in files]
    world = profiles[0].get("world", len(profiles))
    missing = sorted(set(range(world)) - {p["rank"] for p in profiles})
    if missing:
        raise ConfigError(f"{folder} lacks the profiles of rank(s) {missing} of {world}")
    return profiles


def backward_ratio(profiles: list[dict]) -> float | None:
    """Mean backward / mean forward time on the first pipeline stage (whose
    forward and backward are separate phases in both frameworks)."""
    fwd, bwd = [], []
    for p in profiles:
        if p.get("pp", 1) > 1 and tuple(p.get("coords", (0, 0, 0)))[2] == 0:
            fwd += [e - s for n, c, s, e, _ in p["events"] if n == "forward"]
            bwd += [e - s for n, c, s, e, _ in p["events"] if n == "backward"]
    if not fwd or not bwd:
        return None
    return (sum(bwd) / len(bwd)) / max(sum(fwd) / len(fwd), 1e-9)


def summarize(profile: dict, ratio: float | None = None) -> RankSummary:
    """Per-rank figures over the profiled steps (see the module docstring).

    Args:
        ratio: backward / forward cost for the simulated bubble
            (:func:`backward_ratio`); 2 when None.
    """
    events = profile["events"]
    steps = [(s, e) for n, c, s, e, _ in events if c == "step"]
    waits = _union((s, e) for n, c, s, e, _ in events if c.startswith("wait:"))
    compute = _union((s, e) for n, c, s, e, _ in events if c == "compute")
    busy = _union([*waits, *compute])
    span = _length(steps) or 1e-12
    n_steps = max(1, len(steps))
    pp_waits = _union((s, e) for n, c, s, e, _ in events if c == "wait:pp")
    idle = _minus(_union(steps), busy)
    bubble = simulated = None
    pp = profile.get("pp", 1)
    if pp > 1:
        bubble = (_length(pp_waits) + idle) / span
        from fractions import Fraction

        from .pipeline_sim import simulate_schedule

        cost = Fraction(ratio if ratio else 2.0).limit_denominator(20)
        sim = simulate_schedule(profile["schedule"], pp, profile["micro_batches"],
                                profile.get("virtual_stages", 1), 1, max(cost, Fraction(1, 20)))
        simulated = float(sim.bubble_fraction)
    return RankSummary(profile["rank"], tuple(profile.get("coords", (0, 0, 0))),
                       span / n_steps, _minus(compute, waits) / n_steps,
                       _length(waits) / n_steps, idle / n_steps, bubble, simulated)


def _horovod_events(path: Path, zero: float, wall_minus_mono: float, pid: int) -> list[dict]:
    """Horovod's timeline (written by rank 0) on the merged clock, as one process row.

    Horovod stamps events in microseconds since its start and writes that
    start as wall-clock microseconds (``start_time_since_epoch_in_micros``);
    rank 0's profile holds its wall-clock minus monotonic clock, which maps
    them onto rank 0's monotonic clock, the merged trace's time base.
    Horovod's per-tensor rows become threads of that process.
    """
    text = path.read_text().strip()
    if not text:
        return []
    if not text.endswith("]"):  # cut off while being written
        text = text.rstrip(",\n ") + "]"
    try:
        raw = json.loads(text)
    except ValueError:
        return []
    start = None
    for ev in raw:
        if isinstance(ev, dict) and "start_time_since_epoch_in_micros" in ev.get("args", {}):
            start = float(ev["args"]["start_time_since_epoch_in_micros"]) / 1e6
    if start is None:
        return []
    shift = (start - wall_minus_mono - zero) * 1e6
    out = [{"ph": "M", "name": "process_name", "pid": pid,
            "args": {"name": "Horovod timeline (rank 0's view of its collectives)"}},
           {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}}]
    for ev in raw:
        if not isinstance(ev, dict):
            continue
        tensor = int(ev.get("pid", 0))
        if ev.get("ph") == "M":
            if ev.get("name") == "process_name" and "name" in ev.get("args", {}):
                out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tensor,
                            "args": {"name": ev["args"]["name"]}})
            continue
        ev = dict(ev, pid=pid, tid=tensor)
        if "ts" in ev:
            ev["ts"] = float(ev["ts"]) + shift
        out.append(ev)
    return out


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Merge ``run_dir``'s profiles into one trace; return the summary text."""
    run = Path(run_dir)
    profiles = _read_profiles(run)
    starts = [s + p["clock_offset"] for p in profiles for _, _, s, _, _ in p["events"]]
    zero = min(starts) if starts else 0.0
    trace: list[dict] = []
    for p in profiles:
        rank, off = p["rank"], p["clock_offset"]
        d, t, s = p.get("coords", (0, 0, 0))
        trace.append({"ph": "M", "name": "process_name", "pid": rank,
                      "args": {"name": f"rank {rank} (dp {d}, tp {t}, pp {s}) on {p['host']}"}})
        trace.append({"ph": "M", "name": "process_sort_index", "pid": rank,
                      "args": {"sort_index": rank}})
        for tid, name in ((0, "compute"), (1, "waits on other ranks")):
            trace.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid,
                          "args": {"name": name}})
        for name, cat, start, end, args in p["events"]:
            if cat == "post":
                trace.append({"ph": "i", "s": "t", "name": name, "cat": cat, "pid": rank,
                              "tid": 1, "ts": (start + off - zero) * 1e6, "args": args})
                continue
            tid = 1 if cat.startswith("wait:") else 0
            label = name
            if name in ("forward", "backward") and args:
                label = f"{name} mb{args.get('mb', '?')}" + (f" c{args['chunk']}" if "chunk" in args else "")
            trace.append({"ph": "X", "name": label, "cat": cat, "pid": rank, "tid": tid,
                          "ts": (start + off - zero) * 1e6, "dur": (end - start) * 1e6,
                          "args": args})
    hvd = run / PROFILE_DIR / HOROVOD_TIMELINE_FILE
    rank0 = next(p for p in profiles if p["rank"] == 0)
    if hvd.is_file():
        trace += _horovod_events(hvd, zero, rank0["wall_minus_monotonic"], len(profiles))
    target = Path(out) if out else run / "timeline.json"
    target.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms",
                                  "otherData": {"run": str(run), "world": len(profiles)}}))
    ratio = backward_ratio(profiles)
    return format_summary([summarize(p, ratio) for p in profiles], target)


def format_summary(rows: list[RankSummary], target: Path) -> str:
    lines = [f"wrote {target} (open it in ui.perfetto.dev or chrome://tracing)",
             f"{'rank':>4} {'dp,tp,pp':>9} {'step ms':>9} {'compute':>9} {'exposed comm':>13} "
             f"{'idle':>7} {'bubble':>7} {'simulated':>9}"]
    for r in rows:
        pct = lambda x: f"{x / r.step_time * 100:.1f}%" if r.step_time else "-"  # noqa: E731
        bub = f"{r.bubble * 100:.1f}%" if r.bubble is not None else "-"
        sim = f"{r.simulated_bubble * 100:.1f}%" if r.simulated_bubble is not None else "-"
        lines.append(f"{r.rank:>4} {','.join(map(str, r.coords)):>9} {r.step_time * 1e3:9.2f} "
                     f"{pct(r.compute):>9} {pct(r.exposed_comm):>13} {pct(r.idle):>7} "
                     f"{bub:>7} {sim:>9}")
    return "\n".join(lines)


def horovod_timeline_path(cfg: Any) -> Path:
    """Where ``train.horovod_timeline`` has Horovod write its timeline."""
    return Path(cfg.output.dir).resolve() / PROFILE_DIR / HOROVOD_TIMELINE_FILE


def enable_horovod_timeline(cfg: Any) -> None:
    """Set ``HOROVOD_TIMELINE`` (before Horovod starts) when the config asks for it."""
    if cfg.train.horovod_timeline and "HOROVOD_TIMELINE" not in os.environ:
        path = horovod_timeline_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.environ["HOROVOD_TIMELINE"] = str(path)


@contextlib.contextmanager
def profiling(cfg: Any, comm: Any, coords: tuple[int, int, int]) -> Iterator[Profiler | None]:
    """Install a profiler for the run when ``train.profile_steps`` asks (collective)."""
    steps = cfg.train.profile_steps
    if not steps:
        yield None
        return
    p = cfg.parallel
    offset = align_clocks(comm)
    meta = {"world": comm.Get_size(), "coords": list(coords), "dp": p.dp, "tp": p.tp, "pp": p.pp,
            "schedule": p.schedule, "virtual_stages": p.virtual_stages,
            "micro_batches": cfg.grad_accum_steps, "framework": cfg.train.framework}
    meta["wall_minus_monotonic"] = time.time() - time.monotonic()
    prof = Profiler(comm.Get_rank(), steps[0], steps[1], cfg.output.dir, offset, meta).install()
    try:
        yield prof
    finally:
        prof.uninstall()
        prof.finish()
