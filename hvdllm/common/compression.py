"""Gradient compression modes: names, config checks and wire-byte accounting.

Framework-free, so that the torch adapter (:mod:`hvdllm.torch.compression`)
and a later TensorFlow one validate and count the same way.

Modes (config key ``train.compression``):

* ``none``: fp32 average.
* ``fp16`` / ``bf16``: each rank casts its gradient to the 16-bit type for
  the wire; partial sums are taken in fp32 and the average is sent back in
  the 16-bit type.
* ``topk``: each rank sends the ``train.topk_ratio`` fraction of entries
  with the largest magnitude (values and indices, by allgather); what it
  did not send is added to its next step's gradient (error feedback).
* ``powersgd``: rank-``train.powersgd_rank`` approximation ``P Q^T`` of each
  gradient matrix (Vogels et al., 2019), with error feedback and a warm
  start of ``Q``; 1-D tensors and matrices too small to benefit travel
  uncompressed.

The config loader calls :func:`check_compression` with ``train.compression``,
``train.topk_ratio`` and ``train.powersgd_rank``.

Byte accounting
---------------
The ``*_bytes`` functions give the bytes **one rank sends** for one tensor
in one step, under bandwidth-optimal ring algorithms over ``world`` ranks:

* allreduce of ``n`` items of ``b`` bytes: ``2 (world-1) n b / world``
  (a reduce-scatter then an allgather, each moving ``(world-1)/world`` of
  the buffer);
* allgather of ``n`` items per rank: ``(world-1) n b`` (every rank forwards
  every other rank's block once).

They model the traffic; the MPI library may pick another algorithm.  One
rank sends nothing.  Top-k's allgather grows with ``world`` while an
allreduce does not, so top-k only saves bytes when
``topk_ratio < 1 / world`` (values and int32 indices are 8 bytes an entry
against 4 for a dense fp32 entry sent about twice).
"""
from __future__ import annotations

import difflib
import math
from typing import Sequence

from .errors import ConfigError

COMPRESSIONS = ("none", "fp16", "bf16", "topk", "powersgd")
DEFAULT_TOPK_RATIO = 0.01
DEFAULT_POWERSGD_RANK = 4
FP32_BYTES = 4
HALF_BYTES = 2
#: Values of ``train.reduce_op``.
REDUCE_OPS = ("average", "adasum")


def check_compression(name: str, topk_ratio: float = DEFAULT_TOPK_RATIO,
                      powersgd_rank: int = DEFAULT_POWERSGD_RANK) -> None:
    """Raise :class:`ConfigError` unless the compression settings can work.

    Args:
        name: value of ``train.compression``.
        topk_ratio: value of ``train.topk_ratio``; must lie in (0, 1].
        powersgd_rank: value of ``train.powersgd_rank``; an integer >= 1.
    """
    if name not in COMPRESSIONS:
        near = difflib.get_close_matches(str(name), COMPRESSIONS, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"train.compression = {name!r} is not one of "
                          f"{', '.join(COMPRESSIONS)}{hint}")
    if (isinstance(topk_ratio, bool) or not isinstance(topk_ratio, (int, float))
            or not 0.0 < topk_ratio <= 1.0):
        raise ConfigError(f"train.topk_ratio must be a number in (0, 1] (the fraction of "
                          f"gradient entries top-k sends), got {topk_ratio!r}")
    if isinstance(powersgd_rank, bool) or not isinstance(powersgd_rank, int) or powersgd_rank < 1:
        raise ConfigError(f"train.powersgd_rank must be an integer >= 1, got {powersgd_rank!r}")


#: Values of ``train.compression_target``.
COMPRESSION_TARGETS = ("gradient", "momentum")


def check_compression_target(target: str, compression: str = "none", optimizer: str = "adamw",
                             framework: str = "torch") -> None:
    """Raise :class:`ConfigError` unless ``train.compression_target = target`` can work.

    "momentum" compresses AdamW's momentum after a warm-up with ``v`` frozen
    (1-bit Adam's scheme): it needs a compressor, AdamW and the torch engine.
    """
    if target not in COMPRESSION_TARGETS:
        raise ConfigError(f"train.compression_target must be one of "
                          f"{', '.join(COMPRESSION_TARGETS)}, got {target!r}")
    if target == "gradient":
        return
    if compression == "none":
        raise ConfigError('train.compression_target = "momentum" needs a train.compression '
                          'other than "none"')
    if optimizer != "adamw":
        raise ConfigError(f'train.compression_target = "momentum" needs train.optimizer = '
                          f'"adamw", got {optimizer!r}')
    if framework != "torch":
        raise ConfigError(f'train.compression_target = "momentum" is implemented for '
                          f'train.framework = "torch" only, got {framework!r}')


def topk_count(numel: int, ratio: float) -> int:
    """Entries top-k keeps of ``numel``: ``floor(ratio * numel)``, at least 1."""
    return max(1, min(numel, int(ratio * numel)))


def index_bytes(numel: int) -> int:
    """Bytes of one top-k index: int32 while the tensor is indexable by it, else int64."""
    return 4 if numel < 2**31 else 8


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view PowerSGD compresses: the first axis by all the others."""
    rows = int(shape[0])
    return rows, math.prod(int(s) for s in shape[1:])


def powersgd_effective_rank(shape: Sequence[int], rank: int) -> int:
    """Rank PowerSGD uses for ``shape``: the requested one, capped by the matrix size."""
    rows, cols = matrix_shape(shape)
    return min(rank, rows, cols)


def powersgd_compresses(shape: Sequence[int], rank: int) -> bool:
    """True when PowerSGD sends less than the dense tensor for ``shape``.

    1-D (and 0-D) tensors are never compressed; a matrix is compressed when
    its factors ``P`` (rows x r) and ``Q`` (cols x r) are smaller than it.
    """
    if len(shape) < 2:
        return False
    rows, cols = matrix_shape(shape)
    r = powersgd_effective_rank(shape, rank)
    return (rows + cols) * r < rows * cols


def allreduce_bytes(numel: int, itemsize: int, world: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``numel`` items."""
    return 2 * (world - 1) * numel * itemsize // world


def allgather_bytes(numel_per_rank: int, itemsize: int, world: int) -> int:
    """Bytes one rank sends in a ring allgather of ``numel_per_rank`` items from each rank."""
    return (world - 1) * numel_per_rank * itemsize


def half_wire_bytes(numel: int, world: int) -> int:
    """Bytes one rank sends for fp16/bf16: an alltoall then an allgather of 16-bit chunks.

    The tensor is padded to a multiple of ``world``; each phase sends
    ``world - 1`` chunks of ``ceil(numel / world)`` items.
    """
    chunk = -(-numel // world)
    return 2 * (world - 1) * chunk * HALF_BYTES


def wire_bytes(mode: str, shape: Sequence[int], world: int, *,
               topk_ratio: float = DEFAULT_TOPK_RATIO,
               powersgd_rank: int = DEFAULT_POWERSGD_RANK) -> int:
    """Bytes one rank sends to average one fp32 gradient of ``shape`` under ``mode``.

    Args:
        mode: one of :data:`COMPRESSIONS`.
        shape: the gradient's shape.
        world: ranks in the data-parallel group.
        topk_ratio: fraction of entries top-k sends.
        powersgd_rank: requested PowerSGD rank.
    """
    check_compression(mode, topk_ratio, powersgd_rank)
    numel = math.prod(int(s) for s in shape)
    if world == 1 or numel == 0:
        return 0
    if mode == "none":
        return allreduce_bytes(numel, FP32_BYTES, world)
    if mode in ("fp16", "bf16"):
        return half_wire_bytes(numel, world)
    if mode == "topk":
        k = topk_count(numel, topk_ratio)
        return allgather_bytes(k, FP32_BYTES + index_bytes(numel), world)
    if not powersgd_compresses(shape, powersgd_rank):
        return allreduce_bytes(numel, FP32_BYTES, world)
    rows, cols = matrix_shape(shape)
    r = powersgd_effective_rank(shape, powersgd_rank)
    return (allreduce_bytes(rows * r, FP32_BYTES, world)
            + allreduce_bytes(cols * r, FP32_BYTES, world))


def check_reduce_op(name: str, compression: str = "none", zero: int = 0, dp: int = 1) -> None:
    """Raise :class:`ConfigError` unless ``train.reduce_op = name`` works with the other settings.

    Adasum is Horovod's own reduction of dense gradients: it combines with
    neither a compressor nor ZeRO-1's reduce-scatter, and its recursive
    halving needs a power-of-two group.
    """
    if name not in REDUCE_OPS:
        raise ConfigError(f"train.reduce_op must be one of {', '.join(REDUCE_OPS)}, got {name!r}")
    if name == "average":
        return
    if compression != "none":
        raise ConfigError(f"train.reduce_op = \"adasum\" reduces dense fp32 gradients and cannot "
                          f"be combined with train.compression = {compression!r}")
    if zero:
        raise ConfigError("train.reduce_op = \"adasum\" cannot be combined with train.zero = 1 "
                          "(ZeRO-1 reduce-scatters the gradients)")
    if dp < 1 or dp & (dp - 1):
        raise ConfigError(f"train.reduce_op = \"adasum\" needs parallel.dp to be a power of two, "
                          f"got {dp}")
