"""ZeRO stage 1 partition arithmetic: a flat parameter layout cut into dp shards.

Framework-free.  Parameters are laid end to end in one flat buffer, in the
order given (the optimizer's parameter-group order), and the buffer is
padded with zeros to a multiple of ``dp`` so that it splits into ``dp``
equal shards.  Data-parallel rank ``r`` owns ``[r * shard, (r + 1) * shard)``
of it: the optimizer state of those elements and their update.  A
reduce-scatter of the flat gradient gives each rank exactly its shard, and
an allgather of the updated shards rebuilds every parameter.

Config checks for ``train.zero`` live here too, because they run before any
framework is imported: the config loader calls
``check_zero(train.zero, train.compression)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError

ZERO_STAGES = (0, 1)
ZERO_OPTIMIZERS = ("adamw", "adam")


def check_zero_optimizer(name: str) -> None:
    """Raise :class:`ConfigError` unless ZeRO-1 can shard optimizer ``name``."""
    if str(name).lower() not in ZERO_OPTIMIZERS:
        raise ConfigError(f"ZeRO-1 (train.zero = 1) shards the state of "
                          f"{' and '.join(ZERO_OPTIMIZERS)} only, not {name!r}")


def check_zero(stage: int, compression: str = "none", optimizer: str = "adamw") -> None:
    """Raise :class:`ConfigError` unless ``train.zero = stage`` works with the other settings.

    Args:
        stage: value of ``train.zero`` (0 = off, 1 = shard optimizer state).
        compression: value of ``train.compression``; ZeRO-1 reduce-scatters
            fp32 gradients itself, so only "none" combines with it.
        optimizer: the optimizer's name.
    """
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ConfigError(f"train.zero must be 0 (off) or 1 (shard optimizer state), got {stage!r}")
    if stage == 0:
        return
    check_zero_optimizer(optimizer)
    if compression != "none":
        raise ConfigError(f"train.zero = 1 reduce-scatters fp32 gradients itself and cannot be "
                          f"combined with train.compression = {compression!r}; use "
                          f"train.compression = \"none\" or train.zero = 0")


@dataclass(frozen=True)
class ShardSlice:
    """The part of one parameter that falls into a shard.

    ``param_start:param_end`` indexes the flattened parameter;
    ``shard_start`` is where that piece begins inside the shard.
    """

    index: int
    param_start: int
    param_end: int
    shard_start: int

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


@dataclass(frozen=True)
class FlatLayout:
    """Parameters of sizes ``numels`` laid end to end, padded to a multiple of ``dp``."""

    numels: tuple[int, ...]
    dp: int

    def __post_init__(self) -> None:
        if isinstance(self.dp, bool) or not isinstance(self.dp, int) or self.dp < 1:
            raise ValueError(f"dp must be a positive integer, got {self.dp!r}")
        if any(n < 0 for n in self.numels):
            raise ValueError(f"parameter sizes must be >= 0, got {list(self.numels)}")

    @property
    def total(self) -> int:
        """Elements of all parameters, without padding."""
        return sum(self.numels)

    @property
    def padded(self) -> int:
        """Flat buffer length: ``total`` rounded up to a multiple of ``dp``."""
        return -(-self.total // self.dp) * self.dp

    @property
    def shard_size(self) -> int:
        return self.padded // self.dp

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat buffer."""
        out, at = [], 0
        for n in self.numels:
            out.append(at)
            at += n
        return tuple(out)

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of data-parallel rank ``rank``'s shard in the flat buffer."""
        if not 0 <= rank < self.dp:
            raise ValueError(f"rank {rank} out of range [0, {self.dp})")
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def local_range(self, start: int, end: int, rank: int) -> tuple[int, int]:
        """Where flat ``[start, end)`` overlaps ``rank``'s shard, in shard coordinates.

        Returns an empty range ``(x, x)`` when they do not overlap.
        """
        s, e = self.shard_range(rank)
        lo, hi = max(start, s), min(end, e)
        if lo >= hi:
            return 0, 0
        return lo - s, hi - s

    def shard_slices(self, rank: int) -> list[ShardSlice]:
        """The parameters (and their slices) stored in ``rank``'s shard, in order."""
        s, e = self.shard_range(rank)
        out = []
        for index, (offset, n) in enumerate(zip(self.offsets, self.numels)):
            lo, hi = max(offset, s), min(offset + n, e)
            if lo < hi:
                out.append(ShardSlice(index, lo - offset, hi - offset, lo - s))
        return out


def build_flat_layout(numels: Sequence[int], dp: int) -> FlatLayout:
    """The flat, padded layout of parameters of sizes ``numels`` over ``dp`` shards."""
    return FlatLayout(tuple(int(n) for n in numels), dp)
