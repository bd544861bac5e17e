"""Training checkpoints: written in parallel, committed atomically, resumed on any layout.

Layout under ``output.dir``::

    checkpoints/
        step-00000100/            a complete checkpoint
            manifest.json         written last, by rank 0
            rank-00000.safetensors
            rank-00001.safetensors
            ...
        .staging-step-00000200/   a save in progress (never read)

**What a rank writes.**  Each rank writes one safetensors file holding only
what it owns (:class:`RankState`): its shards of the parameters and of the
optimizer state, plus per-rank arrays such as compression residuals.  Every
array is described by a :class:`Piece`: the *logical* tensor it belongs to
(the model contract's name, e.g. ``blocks.0.attn.qkv.weight``), its kind
(``param``, ``exp_avg``, ...), how tensor parallelism split that logical
tensor (a :mod:`hvdllm.common.family` split dict) and which TP rank's shard
it is, and, for ZeRO-1, which flat range of that shard.  Replicated state is
written once (by data-parallel rank 0).

**Commit.**  Ranks write into ``.staging-step-N``, flush their file, and send
its checksum and piece list to rank 0.  When every rank has reported, rank 0
writes ``manifest.json`` (step, config, topology, every file's CRC-32 and
size, every piece, every rank's small state), flushes it, and renames the
directory to ``step-N``.  A crash at any moment leaves either the previous
checkpoints or the new one, never a half checkpoint under a final name.

**Background writes.**  :meth:`CheckpointManager.save` takes host copies
(the only cost on the training path) and hands them to a thread, which
writes, agrees and commits over its own duplicate of the world
communicator.  The next save, and the end of the run, wait for it.

**Reading.**  :class:`CheckpointReader` assembles any logical tensor from
the pieces (flat ranges into shards, shards into the full tensor), so a
checkpoint saved at one dp x tp x pp resumes at another.  :func:`select`
finds the newest complete checkpoint, checks sizes and checksums, and falls
back past a damaged one with a one-line warning.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import CheckpointError, ConfigError
from .family import unshard

FORMAT = "hvdllm-training-checkpoint/1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_STAGING_PREFIX = ".staging-"
_TAG_REPORT, _TAG_RESULT = 32111, 32112
REPLICATED = {"kind": "replicated", "dim": None, "parts": 1, "full_rows": None}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# -- what a rank saves ------------------------------------------------------

@dataclasses.dataclass
class Piece:
    """One saved array and where it sits in its logical tensor.

    Attributes:
        logical: the model contract's tensor name (``wte.weight``), or for
            ``kind = "private"`` a rank-private key.
        kind: ``param``, an optimizer slot (``exp_avg``, ``exp_avg_sq``,
            ``momentum``), or ``private`` (restored only on the same rank of
            the same layout).
        split: how tensor parallelism splits the logical tensor (a
            :mod:`hvdllm.common.family` split dict).
        tp_rank, tp_size: whose shard this is.
        flat: ``[start, end)`` of the flattened shard, when only part of
            it is saved here (ZeRO-1 partitions); None for the whole shard.
        shard_shape: shape of the whole TP shard (needed with ``flat``).
    """

    logical: str
    kind: str
    split: dict = dataclasses.field(default_factory=lambda: dict(REPLICATED))
    tp_rank: int = 0
    tp_size: int = 1
    flat: tuple[int, int] | None = None
    shard_shape: tuple[int, ...] | None = None

    def key(self) -> str:
        """The array's name inside the rank file."""
        name = f"{self.kind}/{self.logical}/tp{self.tp_rank}"
        return name if self.flat is None else f"{name}/{self.flat[0]}-{self.flat[1]}"


@dataclasses.dataclass
class RankState:
    """Everything one rank contributes to a checkpoint, already on the host.

    Attributes:
        pieces: arrays with their :class:`Piece` descriptions.
        private: JSON-able per-rank state (RNG states, counters).
        shared: JSON-able state every rank holds alike (the loop's step and
            data position, the loss scaler); rank 0's copy is stored.
    """

    pieces: list[tuple[Piece, np.ndarray]] = dataclasses.field(default_factory=list)
    private: dict[str, Any] = dataclasses.field(default_factory=dict)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, piece: Piece, array: np.ndarray) -> None:
        self.pieces.append((piece, np.array(array, copy=True, order="C")))

    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.pieces)


# -- low-level file helpers ---------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _crc32_file(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def _serialise(state: RankState) -> tuple[bytes, list[dict]]:
    """The rank file's bytes and the manifest entries of its pieces."""
    from safetensors.numpy import save

    arrays, entries = {}, []
    for piece, array in state.pieces:
        key = piece.key()
        if key in arrays:
            raise CheckpointError(f"two arrays of one rank share the checkpoint key {key}")
        arrays[key] = array
        entry = dataclasses.asdict(piece)
        entry.update(key=key, shape=list(array.shape), dtype=array.dtype.str)
        entries.append(entry)
    return save(arrays) if arrays else save({}), entries


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


# -- finding and validating checkpoints ---------------------------------------

def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every committed-looking checkpoint under ``root``, newest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
    return sorted(found, reverse=True)


def read_manifest(path: str | Path) -> dict:
    """The parsed manifest of checkpoint directory ``path``.

    Raises:
        CheckpointError: no manifest, or one that is not valid.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing (an incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mpath} is unreadable or corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not an hvdllm training checkpoint manifest")
    return manifest


def verify(path: str | Path) -> dict:
    """Check that every file of the checkpoint is present, whole and unchanged.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the first bad file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        fpath = path / name
        try:
            size = fpath.stat().st_size
        except OSError:
            raise CheckpointError(f"{fpath} is missing") from None
        if size != info["bytes"]:
            raise CheckpointError(f"{fpath} has {size} bytes, the manifest says "
                                  f"{info['bytes']} (truncated?)")
        if _crc32_file(fpath) != info["crc32"]:
            raise CheckpointError(f"{fpath} fails its checksum (corrupted)")
    return manifest


def is_training_checkpoint(path: str | Path) -> bool:
    """True for a step directory, a ``checkpoints`` directory or a run's output directory."""
    p = Path(path)
    return ((p / MANIFEST).is_file() or bool(list_checkpoints(p))
            or bool(list_checkpoints(p / CHECKPOINTS)))


def newest_usable(path: str | Path, warn=None) -> tuple[Path, dict] | None:
    """The newest checkpoint at ``path`` that verifies, falling back past damaged ones.

    Args:
        path: a step directory, a ``checkpoints`` directory, or an output
            directory holding ``checkpoints/``.
        warn: called with a one-line warning for each damaged checkpoint
            skipped (default: print to stderr).
    """
    warn = warn or (lambda line: print(f"hvdllm: warning: {line}", file=sys.stderr, flush=True))
    p = Path(path)
    if (p / MANIFEST).is_file() or _STEP_DIR.match(p.name):
        candidates = [p]
    else:
        root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
        candidates = [d for _, d in list_checkpoints(root)]
    for cand in candidates:
        try:
            return cand, verify(cand)
        except CheckpointError as exc:
            warn(f"skipping checkpoint {cand}: {exc}")
    return None


# -- reading ------------------------------------------------------------------

class CheckpointReader:
    """Assemble logical tensors and per-rank state from a verified checkpoint.

    Args:
        path: the step directory.
        manifest: its manifest (from :func:`verify`).
    """

    def __init__(self, path: str | Path, manifest: dict | None = None):
        from .checkpoint import read_safetensors

        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        self._read = read_safetensors
        self._files: dict[str, dict[str, np.ndarray]] = {}
        self._index: dict[tuple[str, str], list[dict]] = {}
        for entry in self.manifest["tensors"]:
            self._index.setdefault((entry["kind"], entry["logical"]), []).append(entry)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def shared(self) -> dict:
        return self.manifest["shared"]

    @property
    def topology(self) -> dict:
        return self.manifest["topology"]

    def rank_state(self, rank: int) -> dict:
        return self.manifest["ranks"][str(rank)]

    def _array(self, entry: dict) -> np.ndarray:
        name = entry["file"]
        if name not in self._files:
            self._files[name] = self._read(self.path / name)
        return self._files[name][entry["key"]]

    def names(self, kind: str) -> list[str]:
        """Logical names saved with ``kind``, in the order first saved."""
        return [name for k, name in self._index if k == kind]

    def has(self, kind: str, logical: str) -> bool:
        return (kind, logical) in self._index

    def logical(self, kind: str, name: str) -> np.ndarray:
        """The full logical tensor ``name`` of ``kind`` (``param``, ``exp_avg``, ...).

        Raises:
            CheckpointError: when the pieces are missing or do not cover it.
        """
        entries = self._index.get((kind, name))
        if not entries:
            raise CheckpointError(f"{self.path} holds no {kind} for tensor '{name}'")
        by_rank: dict[int, list[dict]] = {}
        for e in entries:
            by_rank.setdefault(int(e["tp_rank"]), []).append(e)
        size = int(entries[0]["tp_size"])
        if sorted(by_rank) != list(range(size)):
            raise CheckpointError(f"{self.path}: {kind} of '{name}' lacks tensor-parallel "
                                  f"shards (have {sorted(by_rank)} of {size})")
        shards = [self._assemble(by_rank[r], kind, name) for r in range(size)]
        return unshard(shards, entries[0]["split"]) if size > 1 else shards[0].copy()

    def _assemble(self, entries: list[dict], kind: str, name: str) -> np.ndarray:
        whole = [e for e in entries if e["flat"] is None]
        if whole:
            return np.asarray(self._array(whole[0]))
        shape = tuple(entries[0]["shard_shape"])
        flat = np.empty(int(np.prod(shape, dtype=np.int64)), np.dtype(entries[0]["dtype"]))
        covered = np.zeros(flat.size, bool)
        for e in entries:
            lo, hi = e["flat"]
            flat[lo:hi] = np.asarray(self._array(e)).reshape(-1)
            covered[lo:hi] = True
        if not covered.all():
            raise CheckpointError(f"{self.path}: the saved ranges of {kind} '{name}' do not "
                                  f"cover it")
        return flat.reshape(shape)

    def private(self, rank: int, key: str) -> np.ndarray | None:
        """Rank ``rank``'s private array ``key`` (None when not saved)."""
        for e in self._index.get(("private", key), []):
            if e["rank"] == rank:
                return np.array(self._array(e))
        return None

    def private_keys(self, rank: int) -> list[str]:
        return [name for (k, name), es in self._index.items()
                if k == "private" and any(e["rank"] == rank for e in es)]


# -- writing ------------------------------------------------------------------

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


def _poll(done, deadline: float, what: str) -> None:
    pause = 1e-4
    while not done():
        if time.monotonic() > deadline:
            raise CheckpointError(f"checkpoint save timed out waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 5e-3)


class _Agreed(CheckpointError):
    """A save failure every rank learned from rank 0."""


class CheckpointManager:
    """Periodic sharded saves of one rank, written in the background.

    Collective: every rank of the world creates one and calls :meth:`save`
    at the same steps.

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
        self.last_path: Path | None = None
        self.last_stall_sec = 0.0

    # -- the public calls ---------------------------------------------------
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

        ranks = list(range(self.comm.Get_size()))
        with watchdog.current().waiting("checkpoint commit", "world", ranks):
            thread.join(self.timeout_sec * 2 + 60)
        if thread.is_alive():
            raise CheckpointError(f"checkpoint save into {self.root} did not finish within "
                                  f"{self.timeout_sec * 2 + 60:g}s")
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
        staging = self.root / f"{_STAGING_PREFIX}{step_dir_name(step)}"
        final = self.root / step_dir_name(step)
        fname = f"rank-{self.rank:05d}.safetensors"
        report: dict[str, Any] = {"rank": self.rank, "file": fname}
        try:
            staging.mkdir(parents=True, exist_ok=True)
            data, entries = _serialise(state)
            _write_bytes(staging / fname, data)
            report.update(ok=True, crc32=zlib.crc32(data), bytes=len(data), tensors=entries,
                          private=state.private, shared=state.shared)
            del data
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
            _write_bytes(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(staging)
            if final.exists():  # the same step saved again (a rerun): replace it whole
                retired = self.root / f"{_STAGING_PREFIX}retired-{final.name}"
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(final, retired)
                os.replace(staging, final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, final)
            _fsync_dir(self.root)
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


def remove_staging(root: str | Path) -> list[Path]:
    """Delete leftover staging directories (saves that never committed); returns them."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_STAGING_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                gone.append(child)
    return gone


# -- comparing configs -----------------------------------------------------------

MODEL_FIELDS_IGNORED = ("init_from", "dropout", "init_std")


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``model.KEY: checkpoint V1, config V2`` for each model field that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in MODEL_FIELDS_IGNORED:
            continue
        a, b = saved.get(key), current.get(key)
        if a != b:
            out.append(f"model.{key}: checkpoint {a!r}, config {b!r}")
    return out


def consolidated_parameters(path: str | Path,
                            names: Iterable[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The model section and full logical parameters of a training checkpoint.

    Args:
        path: a step directory, a ``checkpoints`` directory or an output
            directory (the newest usable checkpoint is taken).
        names: the logical names wanted (default: every saved parameter).
    """
    found = newest_usable(path)
    if found is None:
        raise CheckpointError(f"{path} holds no usable training checkpoint")
    ckpt, manifest = found
    reader = CheckpointReader(ckpt, manifest)
    wanted = list(names) if names is not None else reader.names("param")
    return manifest["config"]["model"], {n: reader.logical("param", n) for n in wanted}
