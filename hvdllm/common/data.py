"""Training text: byte-level tokenizer, corpus loading and a DP-sharded sampler.

Samples are non-overlapping windows of ``seq_len + 1`` tokens (inputs plus
the next-token targets) over the whole corpus.  The sampler turns an
endless, seeded stream of epochs (each a permutation of all samples) into
global batches, and hands every DP rank its contiguous slice of each batch:

    stream position p  ->  epoch p // n, sample perm[epoch][p % n]

Consecutive global batches take consecutive stretches of the stream, so
each sample is seen exactly once per epoch across all ranks together, and
the only state needed to resume is the stream position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, load_tokenizer  # noqa: F401 (re-exported)


def bundled_corpus_text() -> str:
    """Python's own documentation topics: about 0.5 MB of English, no download."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics)) + "\n"


def _read_dir(root: Path) -> bytes:
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"data.path {root} is a directory with no files")
    return b"\n\n".join(p.read_bytes() for p in files)


def load_tokens(path: str = "", tokenizer: str = "bytes"):
    """Token array of the corpus at ``path``; "" is the bundled corpus.

    ``path`` may be a text file or a directory, read recursively in sorted
    order (hidden files skipped), encoded with ``tokenizer``
    (``data.tokenizer``): bytes give a uint8 array.  A directory written by
    ``hvdllm prepare`` is opened memory-mapped instead
    (:class:`hvdllm.common.shards.TokenShards`), after checking that it was
    made with ``tokenizer``.
    """
    from .shards import TokenShards, check_tokenizer_matches, is_prepared

    tok = load_tokenizer(tokenizer)
    if path == "":
        return _encode(tok, bundled_corpus_text().encode("utf-8"))
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DataError(f"data.path not found: {path}")
    if is_prepared(p):
        shards = TokenShards(p)
        check_tokenizer_matches(shards, tokenizer)
        return shards
    try:
        raw = _read_dir(p) if p.is_dir() else p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data.path {path}: {exc.strerror or exc}") from None
    if not raw:
        raise DataError(f"data.path {path} is empty")
    return _encode(tok, raw)


def _encode(tok, raw: bytes) -> np.ndarray:
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer(raw, dtype=np.uint8).copy()
    ids = tok.encode(raw.decode("utf-8", errors="replace"))
    return ids.astype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)


class TokenWindows:
    """Non-overlapping ``seq_len + 1`` windows over a token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, what: str = "corpus"):
        if seq_len < 1:
            raise ConfigError(f"model.seq_len must be >= 1, got {seq_len}")
        # A memory-mapped prepared corpus stays on disk: only batches are gathered.
        self.tokens = tokens if hasattr(tokens, "fingerprint") else np.asarray(tokens)
        self.seq_len = seq_len
        self.num_samples = (len(self.tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise DataError(
                f"{what} has {len(self.tokens)} tokens, shorter than model.seq_len + 1 = "
                f"{seq_len + 1}; use more text or a smaller seq_len"
            )

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, both int64 of shape (len(indices), seq_len)."""
        idx = np.asarray(indices, dtype=np.int64)
        starts = idx * self.seq_len
        offsets = np.arange(self.seq_len + 1)
        win = self.tokens[starts[:, None] + offsets[None, :]].astype(np.int64)
        return win[:, :-1], win[:, 1:]


def split_validation(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, validation tokens): the last ``fraction`` of ``tokens`` is held out.

    The two parts do not overlap, so no training window shares a token with
    a validation window.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {fraction:g}")
    held = int(round(len(tokens) * fraction))
    cut = len(tokens) - held
    return tokens[:cut], tokens[cut:]


def load_datasets(path: str, val_fraction: float, val_path: str, seq_len: int,
                  tokenizer: str = "bytes") -> tuple["TokenWindows", "TokenWindows | None"]:
    """Training windows and validation windows (None without a validation set).

    Args:
        path: ``data.path`` (see :func:`load_tokens`).
        val_fraction: held-out tail of the corpus (``data.val_fraction``).
        val_path: a separate validation corpus (``data.val_path``), read
            like ``path``.
        seq_len: tokens per sequence.
        tokenizer: ``data.tokenizer``.
    """
    tokens = load_tokens(path, tokenizer)
    val_tokens = None
    if val_path:
        try:
            val_tokens = load_tokens(val_path, tokenizer)
        except DataError as exc:
            raise DataError(str(exc).replace("data.path", "data.val_path", 1)) from None
    elif val_fraction > 0:
        tokens, val_tokens = split_validation(tokens, val_fraction)
        if len(val_tokens) < seq_len + 1:
            raise DataError(
                f"data.val_fraction={val_fraction:g} holds out {len(val_tokens)} tokens, fewer "
                f"than one window of model.seq_len + 1 = {seq_len + 1}; raise it")
    train = TokenWindows(tokens, seq_len)
    val = None if val_tokens is None else TokenWindows(val_tokens, seq_len, what="validation set")
    return train, val


def eval_micro_batches(num_windows: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int, max_batches: int) -> list[list[np.ndarray]]:
    """This rank's micro-batches (window indices) of each validation batch.

    Validation batch ``b`` is windows ``b * G .. (b + 1) * G`` (G the global
    batch size) in corpus order, so every layout evaluates the same windows;
    each DP rank takes its contiguous slice, cut into micro-batches, as
    :class:`ShardedBatchSampler` does for training.  At most ``max_batches``
    whole batches; raises :class:`DataError` when not even one fits.
    """
    batches = min(max_batches, num_windows // global_batch_size)
    if batches < 1:
        raise DataError(
            f"the validation set has {num_windows} window(s) of model.seq_len + 1 tokens, "
            f"fewer than one global batch of {global_batch_size}; use more validation text")
    per_rank = global_batch_size // dp_size
    out = []
    for b in range(batches):
        start = b * global_batch_size + dp_rank * per_rank
        mine = np.arange(start, start + per_rank, dtype=np.int64)
        out.append([mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)])
    return out


@dataclass
class SamplerState:
    """Everything needed to resume the data order: the stream position."""

    consumed: int = 0


class ShardedBatchSampler:
    """Global batches over an endless seeded stream, sharded by DP rank.

    Args:
        num_samples: number of samples in the dataset.
        global_batch_size: samples per optimizer step over all DP ranks.
        micro_batch_size: samples per rank per forward pass.
        dp_rank, dp_size: this rank's slot in the data-parallel group.
        seed: seed of the epoch permutations.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global batch {global_batch_size} is not divisible by micro batch "
                f"{micro_batch_size} x dp {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.accum_steps = global_batch_size // (micro_batch_size * dp_size)
        self.state = SamplerState()
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.pop(min(self._perm_cache))
            rng = np.random.default_rng([self.seed, epoch])
            if self.num_samples < 1 << 32:
                # The order of rng.permutation(n) at half its memory (8 -> 4 bytes a window).
                perm = np.arange(self.num_samples, dtype=np.uint32)
                rng.shuffle(perm)
            else:
                perm = rng.permutation(self.num_samples)
            self._perm_cache[epoch] = perm
        return self._perm_cache[epoch]

    def stream(self, start: int, count: int) -> np.ndarray:
        """Sample indices at stream positions ``start .. start + count``."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        epochs = pos // self.num_samples
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.num_samples]
        return out

    @property
    def epoch(self) -> float:
        return self.state.consumed / self.num_samples

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches (sample indices) for the next optimizer step."""
        per_rank = self.micro_batch_size * self.accum_steps
        start = self.state.consumed + self.dp_rank * per_rank
        mine = self.stream(start, per_rank)
        self.state.consumed += self.global_batch_size
        return [mine[i * self.micro_batch_size:(i + 1) * self.micro_batch_size]
                for i in range(self.accum_steps)]

    def state_dict(self) -> dict:
        return {"consumed": self.state.consumed, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume data order: saved {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}"
                )
        self.state.consumed = int(state["consumed"])
