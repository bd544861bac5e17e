"""Pre-tokenized corpora on disk: ``hvdllm prepare`` writes them, training memory-maps them.

A prepared corpus is a directory::

    index.json          format, dtype, tokenizer, and every shard's token count
    shard-00000.bin     raw little-endian token ids (uint16, or uint32 past 65,536)
    shard-00001.bin     ...
    tokenizer.json      a copy of the tokenizer (Hugging Face ones only)

The token stream is the shards in order: the corpus files in sorted order,
each file followed by the tokenizer's end-of-text token (``"\\n\\n"`` for
bytes).  Files are cut into pieces of about ``piece_bytes`` at newlines,
each piece becomes one shard, and the pieces are spread over the workers
(processes, or the ranks of an ``mpirun``).  The cuts depend only on the
files, so the stream is the same whatever the number of workers.

:class:`TokenShards` reads a prepared corpus without loading it: every shard
is an ``np.memmap``, and indexing gathers just the tokens asked for, so a
training rank holds only the windows of its batch.
"""
from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError
from .tokenizer import ByteTokenizer, corpus_files, load_tokenizer, tokenizer_file

INDEX = "index.json"
FORMAT = "hvdllm-tokens"
VERSION = 1
PIECE_BYTES = 64 << 20
ENCODE_BYTES = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``hvdllm prepare``."""
    return (Path(os.path.expanduser(str(path))) / INDEX).is_file()


@dataclass(frozen=True)
class Piece:
    """Bytes ``start .. end`` of ``path``; ``last``: the file's final piece."""

    path: str
    start: int
    end: int
    last: bool


def plan_pieces(files: Sequence[Path], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Cut each file into pieces of about ``piece_bytes``, ending after a newline
    (or at the file's end)."""
    pieces: list[Piece] = []
    for path in files:
        size = path.stat().st_size
        start = 0
        with open(path, "rb") as f:
            while start < size:
                end = min(start + piece_bytes, size)
                if end < size:
                    f.seek(end)
                    tail = f.read(1 << 16)
                    nl = tail.find(b"\n")
                    end = size if nl < 0 else min(end + nl + 1, size)
                pieces.append(Piece(str(path), start, end, last=end >= size))
                start = end
        if size == 0:
            pieces.append(Piece(str(path), 0, 0, last=True))
    return pieces


def _separator(tokenizer) -> np.ndarray:
    if tokenizer.eos_id is not None:
        return np.array([tokenizer.eos_id], dtype=np.int64)
    return np.asarray(tokenizer.encode("\n\n"), dtype=np.int64)


def _encode_piece(piece: Piece, tokenizer_spec: str, out_path: str) -> int:
    """Tokenize one piece into ``out_path``; its token count.  Reads and encodes
    about ``ENCODE_BYTES`` at a time, cut at newlines, so memory stays small."""
    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.vocab_size)
    count = 0
    with open(piece.path, "rb") as src, open(out_path, "wb") as dst:
        src.seek(piece.start)
        left = piece.end - piece.start
        carry = b""
        while left > 0 or carry:
            block = src.read(min(ENCODE_BYTES, left)) if left > 0 else b""
            left -= len(block)
            data = carry + block
            if left > 0:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            if data:
                if isinstance(tokenizer, ByteTokenizer):  # the bytes as they are, as data.path reads them
                    ids = np.frombuffer(data, dtype=np.uint8)
                else:
                    ids = np.asarray(tokenizer.encode(data.decode("utf-8", errors="replace")))
                ids.astype(dtype).tofile(dst)
                count += len(ids)
        if piece.last:
            _separator(tokenizer).astype(dtype).tofile(dst)
            count += len(_separator(tokenizer))
    return count


def _mpi_world() -> Any | None:
    if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def prepare(corpus: Sequence[str], tokenizer_spec: str, out_dir: str | Path,
            workers: int = 0, piece_bytes: int = PIECE_BYTES) -> dict:
    """Tokenize ``corpus`` once into ``out_dir``; returns the index.

    Under ``mpirun`` the ranks share the pieces (rank 0 writes the index);
    otherwise ``workers`` processes do (0: one per core).
    """
    tokenizer = load_tokenizer(tokenizer_spec)
    files = corpus_files(corpus)
    if not any(f.stat().st_size for f in files):
        raise DataError(f"the corpus ({', '.join(map(str, corpus))}) is empty: "
                        f"{len(files)} file(s), no text")
    out = Path(out_dir)
    comm = _mpi_world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    problem = None
    if rank == 0:
        try:
            if out.exists() and any(out.iterdir()) and not is_prepared(out):
                raise DataError(f"--out {out} exists and is not a prepared corpus; "
                                f"name an empty or new directory")
            out.mkdir(parents=True, exist_ok=True)
            for old in out.glob("shard-*.bin"):
                old.unlink()
            (out / INDEX).unlink(missing_ok=True)
        except (DataError, OSError) as exc:
            problem = str(exc) if isinstance(exc, DataError) else f"cannot write --out {out}: {exc}"
    if comm is not None:  # every rank learns of rank 0's failure, none waits for it
        problem = comm.bcast(problem, root=0)
    if problem:
        raise DataError(problem)
    pieces = plan_pieces(files, piece_bytes)
    names = [f"shard-{i:05d}.bin" for i in range(len(pieces))]
    spec = str(tokenizer_file(tokenizer_spec) or "bytes")
    mine = list(range(rank, len(pieces), size))
    counts: dict[int, int] = {}
    if comm is None and len(mine) > 1 and (workers or os.cpu_count() or 1) > 1:
        # fork: the parent has only loaded the tokenizer (no encoding threads
        # started yet), and a forked worker needs no importable __main__.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count(),
                                 mp_context=multiprocessing.get_context(method)) as pool:
            futures = {i: pool.submit(_encode_piece, pieces[i], spec, str(out / names[i]))
                       for i in mine}
            counts = {i: f.result() for i, f in futures.items()}
    else:
        try:
            counts = {i: _encode_piece(pieces[i], spec, str(out / names[i])) for i in mine}
        except OSError as exc:
            if comm is None:
                raise DataError(f"cannot tokenize into {out}: {exc}") from None
            counts = {-1: f"rank {rank}: {exc}"}
    if comm is not None:
        gathered = comm.allgather(counts)
        failed = [part[-1] for part in gathered if -1 in part]
        if failed:
            raise DataError(f"cannot tokenize into {out}: {'; '.join(failed)}")
        counts = {k: v for part in gathered for k, v in part.items()}
    index = None
    if rank == 0:
        total = sum(counts.values())
        if total == 0:
            raise DataError(f"the corpus ({', '.join(map(str, corpus))}) is empty: no tokens")
        index = {
            "format": FORMAT, "version": VERSION,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokens": total, "documents": len(files),
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size},
            "shards": [{"file": names[i], "tokens": counts[i]} for i in range(len(pieces))],
        }
        if tokenizer.kind == "hf":
            shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        tmp = out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out / INDEX)
    if comm is not None:
        index = comm.bcast(index, root=0)
    return index


def _random_access(mapped: np.memmap) -> None:
    """Tell the kernel the windows are read at random: no read-ahead around each one
    (which would map megabytes of the corpus per window into the rank)."""
    mm = getattr(mapped, "_mmap", None)
    advice = getattr(mmap, "MADV_RANDOM", None)
    if mm is not None and advice is not None:
        try:
            mm.madvise(advice)
        except (OSError, ValueError):
            pass


class TokenShards:
    """A prepared corpus as a read-only token array, memory-mapped shard by shard.

    Supports ``len``, integer-array indexing of any shape (returns int64) and
    contiguous slices (a view), which is what :class:`TokenWindows` needs.
    """

    def __init__(self, path: str | Path, _parts=None, _start: int = 0, _len: int | None = None):
        self.path = Path(os.path.expanduser(str(path)))
        if _parts is None:
            self.index, _parts = self._open(self.path)
        else:
            self.index = _parts[2]
        self._maps, self._bounds, _ = _parts
        self._parts = _parts
        self._start = _start
        self._len = int(self._bounds[-1]) - _start if _len is None else _len

    @staticmethod
    def _open(root: Path):
        try:
            index = json.loads((root / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{root / INDEX} is not readable ({exc}); run `hvdllm prepare` "
                            f"again") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{root / INDEX} is not an hvdllm prepared corpus of version "
                            f"{VERSION}")
        dtype = np.dtype(index["dtype"])
        maps, bounds = [], [0]
        for shard in index["shards"]:
            file, n = root / shard["file"], int(shard["tokens"])
            want = n * dtype.itemsize
            try:
                have = file.stat().st_size
            except OSError:
                raise DataError(f"shard {file} of the prepared corpus is missing; run "
                                f"`hvdllm prepare` again") from None
            if have != want:
                raise DataError(f"shard {file} has {have} bytes but the index says {n} tokens "
                                f"({want} bytes): truncated or changed; run `hvdllm prepare` "
                                f"again")
            if n:
                mapped = np.memmap(file, dtype=dtype, mode="r", shape=(n,))
                _random_access(mapped)
                maps.append(mapped)
                bounds.append(bounds[-1] + n)
        if bounds[-1] == 0:
            raise DataError(f"the prepared corpus {root} holds no tokens")
        return index, (maps, np.asarray(bounds, dtype=np.int64), index)

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.index["tokenizer"]["fingerprint"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index["dtype"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                raise IndexError("TokenShards slices must be contiguous")
            return TokenShards(self.path, self._parts, self._start + start, max(stop - start, 0))
        idx = np.asarray(key, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"token index out of range [0, {self._len})")
        flat = idx.ravel() + self._start
        which = np.searchsorted(self._bounds, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=np.int64)
        for shard in np.unique(which):
            sel = which == shard
            out[sel] = self._maps[shard][flat[sel] - self._bounds[shard]]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        """The whole span in memory (only for small corpora and tests)."""
        arr = self[np.arange(self._len)]
        return arr.astype(dtype) if dtype is not None else arr


def check_tokenizer_matches(shards: TokenShards, tokenizer_spec: str) -> None:
    """One-line error when training names a tokenizer other than the one the corpus used."""
    from .errors import ConfigError

    tok = load_tokenizer(tokenizer_spec) if tokenizer_spec not in ("", "bytes") else ByteTokenizer()
    if tok.fingerprint != shards.fingerprint:
        raise ConfigError(
            f"data.tokenizer {tokenizer_spec or 'bytes'!r} is not the tokenizer {shards.path} "
            f"was prepared with ({shards.index['tokenizer']['kind']}, vocabulary "
            f"{shards.vocab_size}); use that tokenizer or prepare the corpus again")
