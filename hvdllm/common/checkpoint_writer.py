"""Writing training checkpoints: one file per rank, a commit by rank 0, in the background.

See :mod:`hvdllm.common.train_checkpoint` for the layout.  A save is:

1. (training thread) :meth:`CheckpointManager.new_state` waits for the
   previous save, then the engine copies its state into the returned
   :class:`RankState`, reusing the previous save's host buffers (fresh
   buffers cost page faults that double the copy on large models);
2. (background thread) the rank streams its pieces into
   ``.staging-step-N/rank-K.safetensors`` straight from those buffers,
   computing the CRC-32 on the way, and flushes it;
3. (background thread) every rank reports to rank 0 over a private duplicate
   of the world communicator; rank 0 writes ``manifest.json``, flushes it,
   renames the directory to ``step-N`` and prunes old checkpoints; every
   rank learns the outcome.

The rank file is written here rather than with ``safetensors.numpy``,
which first builds the whole file in memory (two extra copies of the state,
built while holding the GIL); the bytes are the standard safetensors
layout, so ``safetensors`` and any of its readers load them.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import CheckpointError, ConfigError
from .train_checkpoint import (CHECKPOINTS, FORMAT, MANIFEST, STAGING_PREFIX, RankState,
                               fsync_dir, list_checkpoints, step_dir_name, write_bytes)

_TAG_REPORT, _TAG_RESULT = 32111, 32112
_SAFETENSORS_DTYPES = {"<f8": "F64", "<f4": "F32", "<f2": "F16", "<i8": "I64", "<i4": "I32",
                       "<i2": "I16", "|i1": "I8", "|u1": "U8", "|b1": "BOOL", "<u2": "U16",
                       "<u4": "U32", "<u8": "U64"}


def write_rank_file(path: Path, state: RankState) -> tuple[int, int, list[dict]]:
    """Stream ``state``'s pieces into a safetensors file at ``path`` and flush it.

    Returns:
        (CRC-32 of the file, its size in bytes, the manifest entries).
    """
    header: dict[str, Any] = {}
    entries, arrays, offset = [], [], 0
    for piece, array in state.pieces:
        key = piece.key()
        if key in header:
            raise CheckpointError(f"two arrays of one rank share the checkpoint key {key}")
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.str)
        if dtype is None:
            raise CheckpointError(f"cannot store {key} of dtype {array.dtype} in a checkpoint")
        header[key] = {"dtype": dtype, "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
        entry = piece.as_entry()
        entry.update(key=key, shape=list(array.shape), dtype=array.dtype.str)
        entries.append(entry)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    prefix = len(text).to_bytes(8, "little")
    crc = zlib.crc32(text, zlib.crc32(prefix))
    with open(path, "wb") as f:
        f.write(prefix)
        f.write(text)
        for array in arrays:
            if array.nbytes:
                view = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
                f.write(view)  # the GIL is released while the bytes are written ...
                crc = zlib.crc32(view, crc)  # ... and while they are summed
        f.flush()
        os.fsync(f.fileno())
    return crc, 8 + len(text) + offset, entries


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir/checkpoints`` and prove a file can be written there.

    Raises:
        ConfigError: one line naming the directory and the reason.
    """
    root = Path(out_dir) / CHECKPOINTS
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"output.dir {out_dir} cannot be used for checkpoints: cannot write "
                          f"{exc.filename or root}: {reason}") from None
    return root


def remove_staging(root: str | Path) -> list[Path]:
    """Delete leftover staging directories (saves that never committed); returns them."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(STAGING_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                gone.append(child)
    return gone


# -- the commit's messages, on the manager's own communicator -------------------

def _poll(done, deadline: float, what: str) -> None:
    pause = 1e-4
    while not done():
        if time.monotonic() > deadline:
            raise CheckpointError(f"checkpoint save timed out waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 5e-3)


def _gather_to_root(comm: Any, obj: Any, deadline: float) -> list | None:
    """Send ``obj`` to rank 0 of ``comm``; rank 0 gets every rank's, in order."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != 0:
        req = comm.isend(obj, dest=0, tag=_TAG_REPORT)
        _poll(lambda: req.Test(), deadline, "sending its checkpoint report to rank 0")
        return None
    out = [obj] + [None] * (size - 1)
    for src in range(1, size):
        _poll(lambda: comm.iprobe(source=src, tag=_TAG_REPORT), deadline,
              f"the checkpoint report of rank {src}")
        out[src] = comm.recv(source=src, tag=_TAG_REPORT)
    return out


def _scatter_result(comm: Any, result: Any, deadline: float) -> Any:
    """Rank 0's ``result`` on every rank of ``comm``."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        reqs = [comm.isend(result, dest=dst, tag=_TAG_RESULT) for dst in range(1, size)]
        for r in reqs:
            _poll(lambda: r.Test(), deadline, "sending the checkpoint result")
        return result
    _poll(lambda: comm.iprobe(source=0, tag=_TAG_RESULT), deadline,
          "the checkpoint commit of rank 0")
    return comm.recv(source=0, tag=_TAG_RESULT)


class _Agreed(CheckpointError):
    """A save failure every rank learned from rank 0."""


class CheckpointManager:
    """Periodic sharded saves of one rank, written in the background.

    Collective: every rank of the world creates one and saves at the same
    steps.

    Args:
        out_dir: ``output.dir``; checkpoints go to ``out_dir/checkpoints``.
        comm: the world communicator (duplicated here for the commit traffic).
        keep: how many complete checkpoints to keep (the newest).
        config: the run's config as a dict (stored in every manifest).
        topology: {"dp", "tp", "pp", "world"} of this run.
        framework: "torch" or "tensorflow".
        timeout_sec: bound on waiting for the other ranks' writes.
    """

    def __init__(self, out_dir: str | Path, comm: Any, keep: int, config: Mapping[str, Any],
                 topology: Mapping[str, int], framework: str, timeout_sec: float):
        self.root = Path(out_dir) / CHECKPOINTS
        self.comm = comm.Dup()
        self.rank = comm.Get_rank()
        self.keep = max(int(keep), 1)
        self.config = dict(config)
        self.topology = dict(topology)
        self.framework = framework
        self.timeout_sec = float(timeout_sec)
        self._thread: threading.Thread | None = None
        self._outcome: tuple[str, Any] | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self.last_path: Path | None = None

    # -- the public calls ---------------------------------------------------
    def new_state(self) -> RankState:
        """An empty state to capture into, once the previous save has committed.

        Its copies reuse the previous save's host buffers.

        Raises:
            CheckpointError: the previous save failed.
        """
        self.wait()
        return RankState(buffers=self._buffers)

    def save(self, step: int, state: RankState, blocking: bool = False) -> Path | None:
        """Write ``state`` as this rank's part of the checkpoint at ``step``.

        Waits for the previous save first.  With ``blocking`` the commit is
        finished (on every rank) before returning, and the path returned.

        Raises:
            CheckpointError: a previous save (or this blocking one) failed
                on any rank; the message names the path.
        """
        self.wait()
        self._outcome = None
        self._thread = threading.Thread(target=self._run, args=(step, state),
                                        name=f"hvdllm-checkpoint-{step}", daemon=True)
        self._thread.start()
        if blocking:
            return self.wait()
        return None

    def wait(self) -> Path | None:
        """Finish the save in flight, if any; returns its path.

        Raises:
            CheckpointError: it failed on some rank.
        """
        thread = self._thread
        if thread is None:
            return None
        from . import watchdog

        limit = self.timeout_sec * 2 + 60
        ranks = list(range(self.comm.Get_size()))
        with watchdog.current().waiting("checkpoint commit", "world", ranks):
            thread.join(limit)
        if thread.is_alive():
            raise CheckpointError(f"checkpoint save into {self.root} did not finish within "
                                  f"{limit:g}s")
        self._thread = None
        kind, value = self._outcome or ("error", "checkpoint thread ended without a result")
        if kind != "ok":
            error = CheckpointError(value)
            # Every rank got the same verdict from rank 0: each can end cleanly.
            error.agreed = error.all_ranks = kind == "agreed"  # type: ignore[attr-defined]
            raise error
        self.last_path = value
        return value

    def close(self, wait: bool = True) -> None:
        """Wait for the save in flight (unless not ``wait``) and free the communicator."""
        try:
            if wait:
                self.wait()
        finally:
            try:
                self.comm.Free()
            except Exception:  # noqa: BLE001 - MPI may already be finalising
                pass

    # -- the background part ------------------------------------------------
    def _run(self, step: int, state: RankState) -> None:
        try:
            self._outcome = ("ok", self._write_and_commit(step, state))
        except _Agreed as exc:
            self._outcome = ("agreed", str(exc))
        except Exception as exc:  # noqa: BLE001 - handed to the main thread
            self._outcome = ("error", str(exc) if isinstance(exc, CheckpointError)
                             else f"checkpoint at step {step}: {type(exc).__name__}: {exc}")

    def _write_and_commit(self, step: int, state: RankState) -> Path:
        deadline = time.monotonic() + self.timeout_sec * 2 + 30
        staging = self.root / f"{STAGING_PREFIX}{step_dir_name(step)}"
        final = self.root / step_dir_name(step)
        fname = f"rank-{self.rank:05d}.safetensors"
        report: dict[str, Any] = {"rank": self.rank, "file": fname}
        try:
            staging.mkdir(parents=True, exist_ok=True)
            crc, size, entries = write_rank_file(staging / fname, state)
            report.update(ok=True, crc32=crc, bytes=size, tensors=entries,
                          private=state.private, shared=state.shared)
        except OSError as exc:
            report.update(ok=False, error=f"cannot write checkpoint file "
                          f"{exc.filename or staging / fname}: {exc.strerror or exc}")
        except CheckpointError as exc:
            report.update(ok=False, error=str(exc))
        reports = _gather_to_root(self.comm, report, deadline)
        result: Any = None
        if self.rank == 0:
            result = self._commit(step, staging, final, reports)
        result = _scatter_result(self.comm, result, deadline)
        if result[0] == "error":
            raise _Agreed(result[1])
        return Path(result[1])

    def _commit(self, step: int, staging: Path, final: Path, reports: list) -> tuple[str, str]:
        failed = [r["error"] for r in reports if not r.get("ok")]
        if failed:
            shutil.rmtree(staging, ignore_errors=True)
            more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            return ("error", f"checkpoint at step {step} failed: {failed[0]}{more}; the previous "
                             f"checkpoints are intact")
        tensors = []
        for r in reports:
            for e in r["tensors"]:
                tensors.append(dict(e, file=r["file"], rank=r["rank"]))
        manifest = {
            "format": FORMAT, "step": step, "framework": self.framework,
            "written_unix": time.time(), "config": self.config, "topology": self.topology,
            "files": {r["file"]: {"crc32": r["crc32"], "bytes": r["bytes"]} for r in reports},
            "shared": reports[0]["shared"],
            "ranks": {str(r["rank"]): r["private"] for r in reports},
            "tensors": tensors,
        }
        try:
            write_bytes(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
            fsync_dir(staging)
            if final.exists():  # the same step saved again (a rerun): replace it whole
                retired = self.root / f"{STAGING_PREFIX}retired-{final.name}"
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(final, retired)
                os.replace(staging, final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, final)
            fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return ("error", f"checkpoint at step {step} failed: cannot write "
                             f"{exc.filename or staging}: {exc.strerror or exc}; the previous "
                             f"checkpoints are intact")
        self._prune(step)
        return ("ok", str(final))

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` checkpoints up to ``step``; later ones are of a past history.

        (A run restarted afresh, or resumed from an older checkpoint after a
        damaged newer one, must not resume from the abandoned line later.)
        """
        for s, d in list_checkpoints(self.root):
            if s > step:
                shutil.rmtree(d, ignore_errors=True)
        complete = [d for s, d in list_checkpoints(self.root)
                    if s <= step and (d / MANIFEST).is_file()]
        for old in complete[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
