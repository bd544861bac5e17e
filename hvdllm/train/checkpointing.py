"""Checkpoints in a run: choosing where to resume, periodic saves, preemption.

* :func:`choose_resume` (collective): rank 0 picks the checkpoint named by
  ``train.resume`` (falling back past damaged ones with a warning) and
  every rank gets its decision;
* :class:`RunCheckpoints`: restores a run from it, saves every
  ``output.checkpoint_every`` steps in the background and at the end, and
  turns SIGTERM / SIGUSR1 into "finish this step, save, exit" on every rank
  together.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..common.comm import wait_requests
from ..common.config import Config
from ..common.errors import CheckpointError, HvdllmError
from ..common.topology import ParallelGroups
from ..common.checkpoint_writer import CheckpointManager, remove_staging
from ..common.train_checkpoint import (CHECKPOINTS, CheckpointReader, list_checkpoints,
                                       model_differences, newest_usable)

#: Exit status after a preemption save: the run is not finished; rerun it to continue.
EXIT_PREEMPTED = 75
_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(HvdllmError):
    """The run stopped on a signal after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED


@dataclasses.dataclass
class ResumePoint:
    """Where a run starts: ``path`` None means from scratch."""

    path: Path | None = None
    manifest: dict | None = None
    step: int = 0


def _pick(cfg: Config) -> tuple[str, Any]:
    """Rank 0's decision: ("fresh", None) | ("resume", path) | ("error", message)."""
    out = Path(cfg.output.dir)
    root = out / CHECKPOINTS
    remove_staging(root)
    mode = cfg.train.resume
    if mode == "never":
        return ("fresh", None)
    if mode == "auto":
        if not list_checkpoints(root):
            return ("fresh", None)
        found = newest_usable(root)
        if found is None:
            return ("error", f"no usable checkpoint in {root}: every one is damaged (see the "
                             f"warnings above); remove them or set train.resume = \"never\"")
        return ("resume", str(found[0]))
    path = Path(mode).expanduser()
    if not path.exists():
        return ("error", f"train.resume: no checkpoint at {mode}")
    inside = root.resolve() in (path.resolve(), *path.resolve().parents)
    if list_checkpoints(root) and not inside:
        # The run has saved checkpoints of its own since it started from ``path``:
        # rerunning the same command continues the run, not its first start.
        own = newest_usable(root)
        if own is not None:
            print(f"hvdllm: {root} holds this run's own checkpoints; continuing from the newest "
                  f"(train.resume = {mode} was its starting point)", flush=True)
            return ("resume", str(own[0]))
    found = newest_usable(path)
    if found is None:
        return ("error", f"train.resume: no usable checkpoint at {mode}")
    return ("resume", str(found[0]))


def choose_resume(cfg: Config, groups: ParallelGroups) -> ResumePoint:
    """The checkpoint this run starts from (collective over the world).

    Raises:
        CheckpointError: on every rank, when ``train.resume`` names nothing
            usable or the checkpoint's model differs from the config.
    """
    decision: tuple[str, Any] = ("fresh", None)
    if groups.world.rank == 0:
        try:
            decision = _pick(cfg)
        except (OSError, HvdllmError) as exc:
            decision = ("error", str(exc))
    kind, value = groups.world.broadcast_object(decision, root=0)
    error = None
    if kind == "error":
        error = CheckpointError(value)
    elif kind == "resume":
        path = Path(value)
        manifest = CheckpointReader(path).manifest
        diffs = model_differences(manifest["config"]["model"], dataclasses.asdict(cfg.model))
        if not diffs:
            return ResumePoint(path, manifest, int(manifest["step"]))
        error = CheckpointError(f"checkpoint {path} is of a different model: "
                                + "; ".join(diffs))
    if error is not None:
        error.agreed = error.all_ranks = True  # type: ignore[attr-defined]
        raise error
    return ResumePoint()


#: The train.* keys that define the learning rate of every step, with their defaults for
#: checkpoints written before a key existed.
SCHEDULE_KEYS = {"lr_schedule": "constant", "lr": None, "min_lr": 0.0, "warmup_steps": None,
                 "steps": None}


def schedule_changes(manifest: dict, cfg: Config) -> str:
    """"key saved -> now" for each schedule setting that differs from the checkpoint's; "" if none."""
    saved = (manifest.get("config") or {}).get("train") or {}
    now = dataclasses.asdict(cfg.train)
    # A constant schedule does not depend on min_lr or steps (extending a run is fine).
    constant = now["lr_schedule"] == saved.get("lr_schedule", "constant") == "constant"
    diffs = []
    for key, default in SCHEDULE_KEYS.items():
        if constant and key in ("min_lr", "steps"):
            continue
        before = saved.get(key, default)
        if before is not None and before != now[key]:
            diffs.append(f"train.{key} {before!r} -> {now[key]!r}")
    return ", ".join(diffs)


def same_layout(manifest: dict, cfg: Config) -> bool:
    topo = manifest["topology"]
    return (manifest.get("framework") == cfg.train.framework
            and (topo["dp"], topo["tp"], topo["pp"]) == (cfg.parallel.dp, cfg.parallel.tp,
                                                          cfg.parallel.pp))


class _StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop acts on it between steps."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in _SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class RunCheckpoints:
    """Resume, periodic and final saves, and preemption for one run.

    Args:
        cfg: the run's config.
        groups: this rank's groups.
        engine: the framework engine (see :class:`hvdllm.train.engine.Engine`).
        sampler: the data sampler (its state is the data position).
    """

    def __init__(self, cfg: Config, groups: ParallelGroups, engine: Any, sampler: Any):
        self.cfg = cfg
        self.groups = groups
        self.engine = engine
        self.sampler = sampler
        o = cfg.output
        self.every = o.checkpoint_every
        topo = groups.topology
        self.manager = CheckpointManager(
            o.dir, groups.world.comm, o.keep_checkpoints, cfg.to_dict(),
            {"dp": topo.dp, "tp": topo.tp, "pp": topo.pp, "world": topo.world_size},
            cfg.train.framework, cfg.parallel.timeout_sec)
        self.stop = _StopRequest()
        self.last_saved = -1
        self._closed = False
        self._flag_comm = groups.world.comm.Dup() if groups.world.size > 1 else None

    # -- start ------------------------------------------------------------
    def restore(self, point: ResumePoint) -> int:
        """Load ``point`` into the engine and the sampler; returns the step to continue after."""
        if point.path is None:
            return 0
        reader = CheckpointReader(point.path, point.manifest)
        layout = same_layout(point.manifest, self.cfg)
        notes = self.engine.restore_state(reader, layout)
        self.sampler.load_state_dict(reader.shared["data"])
        self.last_saved = point.step
        if self.groups.world.rank == 0:
            topo = point.manifest["topology"]
            saved_by = point.manifest.get("framework")
            how = ""
            if saved_by != self.cfg.train.framework:
                how = f" (saved by {saved_by}, continued in {self.cfg.train.framework})"
            elif not layout:
                how = (f" (saved at dp {topo['dp']} x tp {topo['tp']} x pp {topo['pp']}, "
                       f"resharded)")
            print(f"hvdllm: resuming from {point.path} at step {point.step}{how}", flush=True)
            for note in notes:
                print(f"hvdllm: note: {note}", flush=True)
            changed = schedule_changes(point.manifest, self.cfg)
            if changed:
                print(f"hvdllm: warning: the learning-rate schedule differs from the "
                      f"checkpoint's: {changed}; continuing with this config's", flush=True)
        return point.step

    def start(self) -> None:
        self.stop.install()

    # -- during training --------------------------------------------------
    def _save(self, step: int, blocking: bool) -> Path | None:
        state = self.manager.new_state()  # after the previous save, into its buffers
        self.engine.capture_state(state)
        state.shared["step"] = step
        state.shared["data"] = self.sampler.state_dict()
        path = self.manager.save(step, state, blocking=blocking)
        self.last_saved = step
        return path

    def _any_rank_stopping(self) -> bool:
        """Whether a stop signal reached any rank (collective, once per step).

        The ranks have just synchronised in the step, so the agreement
        usually completes at once: it is polled without pausing for a
        moment (a few microseconds), then with the usual bounded wait.
        """
        flag = 1 if self.stop.signal_name else 0
        if self.groups.world.size == 1:
            return bool(flag)
        from mpi4py import MPI

        send, recv = np.array([flag], np.int64), np.zeros(1, np.int64)
        req = self._flag_comm.Iallreduce(send, recv, MPI.MAX)
        spin_until = time.perf_counter() + 2e-3
        while time.perf_counter() < spin_until:
            if req.Test():
                return bool(recv[0])
        world = self.groups.world
        wait_requests([req], f"stop-signal agreement on the world group after "
                             f"{world.timeout_sec:g}s", time.monotonic() + world.timeout_sec,
                      op="stop-signal agreement", group=world)
        return bool(recv[0])

    def after_step(self, step: int) -> None:
        """Save when due; on a stop signal (on any rank) save and raise :class:`Preempted`."""
        if self._any_rank_stopping():
            path = self._save(step, blocking=True)
            what = self.stop.signal_name or "a signal on another rank"
            raise Preempted(f"stopped by {what} after step {step}; checkpoint in {path}; rerun "
                            f"the same command to continue")
        if self.every and step % self.every == 0 and step < self.cfg.train.steps:
            self._save(step, blocking=False)

    def finish(self, step: int) -> Path | None:
        """Write the final checkpoint (when enabled) and wait for every save to commit."""
        path = None
        try:
            if self.cfg.output.checkpoint and self.last_saved != step:
                path = self._save(step, blocking=True)
            else:
                path = self.manager.wait() or None
        finally:
            self.close()
        return path

    def close(self, wait: bool = True) -> None:
        """Restore the signal handlers; with ``wait``, let the save in flight commit."""
        self.stop.uninstall()
        if self._closed:
            return
        self._closed = True
        try:
            self.manager.close(wait=wait)
        except CheckpointError as exc:
            print(f"hvdllm: {exc}", file=sys.stderr, flush=True)
        if self._flag_comm is not None:
            self._flag_comm.Free()

