"""How tensor parallelism splits a logical tensor: the rule as data, and the numpy slicing.

A :class:`Split` is part of the model contract (:mod:`hvdllm.common.family`)
and of every checkpoint manifest (as :meth:`Split.to_dict`).  :func:`shard`
and :func:`unshard` produce and reassemble exactly the pieces the
tensor-parallel layers hold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]

SPLIT_KINDS = ("replicated", "column", "row", "vocab")
_SPLIT_DIMS = {"replicated": None, "column": 0, "row": 1, "vocab": 0}
_SPLIT_KEYS = ("kind", "dim", "parts", "full_rows")


# -- tensor-parallel splits ------------------------------------------------

def padded_rows(rows: int, size: int) -> int:
    """``rows`` rounded up to a multiple of ``size`` (a vocabulary split over tp ranks)."""
    return size * math.ceil(rows / size)


@dataclass(frozen=True)
class Split:
    """How tensor parallelism splits one logical tensor over the ranks of a TP group.

    Attributes:
        kind: "replicated" (every rank holds it all), "column" (split along
            ``dim`` 0, the output rows of a linear weight, or its bias),
            "row" (split along ``dim`` 1, the input columns) or "vocab"
            (rows padded with zeros up to a multiple of the TP size, then
            split along ``dim`` 0 into contiguous ranges).
        dim: the split dimension; None when replicated.
        parts: "column" only: the rows are this many equal fused blocks
            (3 for GPT's q, k, v), each split separately, so that shard
            ``r`` holds ``[q_r k_r v_r]``.
        full_rows: "vocab" only: the unpadded size of ``dim``.
    """

    kind: str = "replicated"
    dim: int | None = None
    parts: int = 1
    full_rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"unknown split kind {self.kind!r}; one of {', '.join(SPLIT_KINDS)}")
        if self.kind == "replicated":
            if (self.dim, self.parts, self.full_rows) != (None, 1, None):
                raise ValueError(f"a replicated split has no dim, parts or full_rows: {self}")
            return
        if not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"a {self.kind} split needs a dimension >= 0, got {self.dim!r}")
        if not isinstance(self.parts, int) or self.parts < 1:
            raise ValueError(f"split parts must be an integer >= 1, got {self.parts!r}")
        if self.parts > 1 and self.kind != "column":
            raise ValueError(f"only a column split has fused parts, got {self}")
        if self.kind == "vocab":
            if not isinstance(self.full_rows, int) or self.full_rows < 1:
                raise ValueError(f"a vocab split needs full_rows >= 1, got {self.full_rows!r}")
        elif self.full_rows is not None:
            raise ValueError(f"only a vocab split has full_rows, got {self}")

    # -- constructors and the dict form -----------------------------------
    @classmethod
    def replicated(cls) -> "Split":
        """Every rank holds the whole tensor."""
        return cls()

    @classmethod
    def column(cls, parts: int = 1) -> "Split":
        """Split the rows (dim 0), each of ``parts`` fused blocks separately."""
        return cls("column", 0, parts)

    @classmethod
    def row(cls) -> "Split":
        """Split the columns (dim 1) of an (out, in) matrix."""
        return cls("row", 1)

    @classmethod
    def vocab(cls, full_rows: int) -> "Split":
        """Pad the ``full_rows`` rows with zeros to a multiple of tp, then split them."""
        return cls("vocab", 0, 1, full_rows)

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "dim", "parts", "full_rows"}``: JSON-able, for checkpoint manifests."""
        return {"kind": self.kind, "dim": self.dim, "parts": self.parts,
                "full_rows": self.full_rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Split":
        """The split a :meth:`to_dict` dict describes.

        Missing keys take their defaults (``dim`` the kind's usual one), so
        ``{"kind": "replicated"}`` and ``{"kind": "row"}`` are enough.

        Args:
            data: the dict; unknown keys are refused.
        """
        unknown = sorted(set(data) - set(_SPLIT_KEYS))
        if unknown:
            raise ValueError(f"unknown split keys {unknown}; expected some of {_SPLIT_KEYS}")
        kind = data.get("kind", "replicated")
        if kind not in SPLIT_KINDS:
            raise ValueError(f"unknown split kind {kind!r}; one of {', '.join(SPLIT_KINDS)}")
        dim = data.get("dim")
        return cls(kind, _SPLIT_DIMS[kind] if dim is None else dim, data.get("parts") or 1,
                   data.get("full_rows"))

    @property
    def sharded(self) -> bool:
        """True unless every rank holds the whole tensor."""
        return self.kind != "replicated"

    # -- the arithmetic ----------------------------------------------------
    def _check_size(self, size: int) -> None:
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {size!r}")

    def _split_rows(self, rows: int, size: int, what: str) -> int:
        """Rows of each shard along ``dim``, for a full extent of ``rows``."""
        if self.kind == "vocab":
            if rows != self.full_rows:
                raise ValueError(f"{what}: dimension {self.dim} has {rows} rows but the vocab "
                                 f"split is of {self.full_rows}")
            return padded_rows(rows, size) // size
        if rows % (self.parts * size):
            fused = f" in {self.parts} fused parts" if self.parts > 1 else ""
            raise ValueError(f"{what}: dimension {self.dim} of {rows}{fused} does not split "
                             f"evenly over {size} tensor-parallel ranks")
        return rows // size

    def shard_shape(self, shape: Sequence[int], size: int) -> Shape:
        """The shape of each rank's shard of a full tensor of ``shape``.

        Args:
            shape: the full tensor's shape.
            size: tensor-parallel degree.
        """
        self._check_size(size)
        shape = tuple(int(n) for n in shape)
        if not self.sharded:
            return shape
        if self.dim >= len(shape):
            raise ValueError(f"a {self.kind} split along dim {self.dim} needs a tensor of more "
                             f"than {len(shape)} dimensions")
        if size == 1 and self.kind != "vocab":
            return shape
        rows = self._split_rows(shape[self.dim], size, f"shape {shape}")
        return shape[:self.dim] + (rows,) + shape[self.dim + 1:]

    def shard(self, full: np.ndarray, rank: int, size: int) -> np.ndarray:
        """Rank ``rank``'s shard of ``full`` out of ``size`` (may share memory with ``full``).

        Args:
            full: the whole logical tensor.
            rank: this rank's index in the TP group.
            size: tensor-parallel degree.
        """
        self._check_size(size)
        if not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
        full = np.asarray(full)
        self.shard_shape(full.shape, size)  # checks divisibility
        if not self.sharded or size == 1:
            return full
        dim = self.dim
        if self.kind == "vocab":
            extra = padded_rows(full.shape[dim], size) - full.shape[dim]
            if extra:
                pad = [(0, 0)] * full.ndim
                pad[dim] = (0, extra)
                full = np.pad(full, pad)
        blocks = np.split(full, self.parts, axis=dim)
        pieces = [np.split(block, size, axis=dim)[rank] for block in blocks]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=dim)

    def unshard(self, pieces: Sequence[np.ndarray]) -> np.ndarray:
        """The full tensor from every rank's shard, in rank order (inverse of :meth:`shard`).

        Args:
            pieces: shard ``r`` of each rank ``r``; a replicated tensor's
                first piece is returned as it is.
        """
        if not pieces:
            raise ValueError("unshard needs at least one piece")
        pieces = [np.asarray(p) for p in pieces]
        if not self.sharded or len(pieces) == 1 and self.kind != "vocab":
            return pieces[0]
        dim, size = self.dim, len(pieces)
        shapes = {p.shape for p in pieces}
        if len(shapes) != 1:
            raise ValueError(f"shards of one tensor must have equal shapes, got {sorted(shapes)}")
        if pieces[0].ndim <= dim or pieces[0].shape[dim] % self.parts:
            raise ValueError(f"shard shape {pieces[0].shape} does not fit a {self.kind} split "
                             f"along dim {dim} in {self.parts} parts")
        # [q0 k0 v0], [q1 k1 v1] -> [q0 q1 k0 k1 v0 v1]
        blocks = [np.split(piece, self.parts, axis=dim) for piece in pieces]
        full = np.concatenate([blocks[r][i] for i in range(self.parts) for r in range(size)],
                              axis=dim)
        if self.kind == "vocab":
            if not full.shape[dim] - size < self.full_rows <= full.shape[dim]:
                raise ValueError(f"{size} vocab shards of {pieces[0].shape[dim]} rows do not "
                                 f"hold a padded vocabulary of {self.full_rows}")
            full = full[(slice(None),) * dim + (slice(0, self.full_rows),)]
        return full


def _as_split(split: Split | Mapping[str, Any]) -> Split:
    return split if isinstance(split, Split) else Split.from_dict(split)


def shard(full: np.ndarray, split: Split | Mapping[str, Any], rank: int,
          size: int) -> np.ndarray:
    """Rank ``rank``'s shard of the full tensor ``full`` (see :meth:`Split.shard`).

    Args:
        full: the whole logical tensor.
        split: a :class:`Split` or its dict form.
        rank: the TP rank.
        size: tensor-parallel degree.
    """
    return _as_split(split).shard(full, rank, size)


def unshard(pieces: Sequence[np.ndarray], split: Split | Mapping[str, Any]) -> np.ndarray:
    """The full tensor from every TP rank's shard, in rank order (see :meth:`Split.unshard`).

    Args:
        pieces: the shards, rank 0 first.
        split: a :class:`Split` or its dict form.
    """
    return _as_split(split).unshard(pieces)
