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
it is, and, for ZeRO-1, which flat range of that shard.  State replicated over
data parallelism is written once, spread over the data-parallel ranks
(:func:`balance`).

**Commit.**  Ranks write into ``.staging-step-N``, flush their file, and send
its checksum and piece list to rank 0.  When every rank has reported, rank 0
writes ``manifest.json`` (step, config, topology, every file's CRC-32 and
size, every piece, every rank's small state), flushes it, and renames the
directory to ``step-N``.  A crash at any moment leaves either the previous
checkpoints or the new one, never a half checkpoint under a final name.

**Background writes.**  The training thread only copies its state to host
buffers; :class:`hvdllm.common.checkpoint_writer.CheckpointManager` writes,
agrees and commits on a background thread.  The next save, and the end of
the run, wait for it.

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
import sys
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import CheckpointError
from .family import unshard

FORMAT = "hvdllm-training-checkpoint/1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
STAGING_PREFIX = ".staging-"
_TAG_REPORT, _TAG_RESULT = 32111, 32112
REPLICATED = {"kind": "replicated", "dim": None, "parts": 1, "full_rows": None}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def balance(sizes: list[int], ways: int) -> list[int]:
    """Owner in ``range(ways)`` of each item, so that every owner gets about as many bytes.

    Largest first to the least loaded; deterministic, so every rank computes
    the same answer from the same sizes.
    """
    load = [0] * ways
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        w = min(range(ways), key=lambda k: (load[k], k))
        owner[i] = w
        load[w] += sizes[i]
    return owner


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

    def as_entry(self) -> dict[str, Any]:
        """The manifest fields of this piece."""
        return dataclasses.asdict(self)

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
    buffers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def add(self, piece: Piece, array: np.ndarray) -> None:
        """Keep a copy of ``array`` (into last save's buffer for this piece, when it fits)."""
        key = piece.key()
        buf = self.buffers.get(key)
        if buf is not None and buf.shape == array.shape and buf.dtype == array.dtype:
            np.copyto(buf, array)
        else:
            buf = self.buffers[key] = np.array(array, copy=True, order="C")
        self.pieces.append((piece, buf))

    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.pieces)


# -- low-level file helpers ---------------------------------------------------

def fsync_dir(path: Path) -> None:
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


def write_bytes(path: Path, data: bytes | memoryview) -> None:
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
