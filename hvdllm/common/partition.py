"""How a model's layers are cut into pipeline chunks: the split arithmetic, framework-free.

The ``n`` transformer layers are cut into ``k = pp * v`` contiguous chunks
(``v`` virtual stages per pipeline rank), each with at least one layer.
Chunk 0 also runs the embedding, and chunk ``k - 1`` the final norm, the
output head and the loss, so their costs count toward those two chunks.
Rank ``s`` of the pipeline holds the chunks ``s, s + pp, s + 2 pp, ...``
(:func:`hvdllm.common.schedules.global_chunk_index`).

A split is a tuple of ``k`` chunk sizes (layers per chunk) in model order.
The methods (``parallel.partition``):

* ``"uniform"``: by layer count alone; sizes differ by at most one and the
  larger chunks come first (the last chunk already carries the head).
* ``"parameters"`` and ``"balanced"``: by cost, with per-layer costs in a
  :class:`LayerCosts` (parameter counts, or forward plus backward time
  measured at start-up).  The split minimises the largest chunk cost (a
  pipeline runs at the pace of its slowest chunk) and, among the splits that
  reach that minimum, the sum of squared chunk costs, so the other chunks
  are as even as they can be too.

Every rank must cut the same split or the stages would wait for each other
forever: the functions here are deterministic, so ranks that agree on the
costs (one rank measures, then broadcasts) agree on the split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .schedules import global_chunk_index

PARTITIONS = ("uniform", "parameters", "balanced")
_REL_TOL = 1e-9


@dataclass(frozen=True)
class LayerCosts:
    """The cost of each piece of a model, in any unit (parameters, seconds).

    Attributes:
        layers: one cost per transformer layer, in model order.
        embedding: the embedding's cost (charged to the first chunk).
        head: the final norm, output head and loss (charged to the last chunk).
    """

    layers: tuple[float, ...]
    embedding: float = 0.0
    head: float = 0.0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("LayerCosts needs at least one layer")
        for name, value in [("embedding", self.embedding), ("head", self.head)] + [
                (f"layer {i}", c) for i, c in enumerate(self.layers)]:
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"cost of the {name} must be finite and >= 0, got {value!r}")


def _check_counts(num_layers: int, num_chunks: int) -> None:
    for name, value in (("num_layers", num_layers), ("num_chunks", num_chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_chunks > num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_chunks} chunks of at "
                         f"least one layer each")


def split_uniform(num_layers: int, num_chunks: int) -> tuple[int, ...]:
    """Chunk sizes that differ by at most one, the larger ones first.

    Args:
        num_layers: layers of the model.
        num_chunks: chunks to cut (``pp * virtual_stages``).
    """
    _check_counts(num_layers, num_chunks)
    base, extra = divmod(num_layers, num_chunks)
    return tuple(base + (1 if i < extra else 0) for i in range(num_chunks))


def chunk_costs(costs: LayerCosts, sizes: Sequence[int]) -> tuple[float, ...]:
    """Total cost of each chunk of a split, embedding and head included.

    Args:
        costs: the model's per-piece costs.
        sizes: layers per chunk, summing to ``len(costs.layers)``.
    """
    if sum(sizes) != len(costs.layers) or any(s < 1 for s in sizes):
        raise ValueError(f"split {tuple(sizes)} does not cut {len(costs.layers)} layers into "
                         f"non-empty chunks")
    out, start = [], 0
    for i, size in enumerate(sizes):
        total = sum(costs.layers[start:start + size])
        if i == 0:
            total += costs.embedding
        if i == len(sizes) - 1:
            total += costs.head
        out.append(total)
        start += size
    return tuple(out)


def split_balanced(costs: LayerCosts, num_chunks: int) -> tuple[int, ...]:
    """The split whose costliest chunk is as cheap as possible (ties: most even).

    Two dynamic programmes over prefixes of the layers: the first finds the
    smallest achievable largest-chunk cost; the second, among the splits
    whose chunks all stay within it, minimises the sum of squared costs.

    Args:
        costs: the model's per-piece costs.
        num_chunks: chunks to cut (``pp * virtual_stages``).
    """
    n = len(costs.layers)
    _check_counts(n, num_chunks)
    prefix = [0.0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)

    def cost(chunk: int, start: int, end: int) -> float:
        total = prefix[end] - prefix[start]
        if chunk == 0:
            total += costs.embedding
        if chunk == num_chunks - 1:
            total += costs.head
        return total

    def solve(score, combine, admissible) -> tuple[float, list[list[int]]]:
        # best[j][i]: best score of cutting the first i layers into j + 1 chunks.
        best = [[math.inf] * (n + 1) for _ in range(num_chunks)]
        cut = [[-1] * (n + 1) for _ in range(num_chunks)]
        for i in range(1, n - num_chunks + 2):
            if admissible(cost(0, 0, i)):
                best[0][i] = score(cost(0, 0, i))
        for j in range(1, num_chunks):
            for i in range(j + 1, n - num_chunks + j + 2):
                for start in range(j, i):
                    prev = best[j - 1][start]
                    c = cost(j, start, i)
                    if prev == math.inf or not admissible(c):
                        continue
                    value = combine(prev, score(c))
                    if value < best[j][i]:
                        best[j][i], cut[j][i] = value, start
        return best[num_chunks - 1][n], cut

    bound, _ = solve(lambda c: c, max, lambda c: True)
    limit = bound * (1 + _REL_TOL) + 1e-300
    _, cut = solve(lambda c: c * c, lambda a, b: a + b, lambda c: c <= limit)
    ends, end = [], n
    for j in range(num_chunks - 1, 0, -1):
        start = cut[j][end]
        ends.append(end - start)
        end = start
    ends.append(end)
    return tuple(reversed(ends))


def split_layers(method: str, num_chunks: int, num_layers: int,
                 costs: LayerCosts | None = None) -> tuple[int, ...]:
    """Chunk sizes for ``parallel.partition = method``.

    Args:
        method: one of :data:`PARTITIONS`.
        num_chunks: chunks to cut (``pp * virtual_stages``).
        num_layers: layers of the model.
        costs: per-piece costs; needed by "parameters" and "balanced".
    """
    if method not in PARTITIONS:
        raise ValueError(f"unknown partition {method!r}; choose one of: {', '.join(PARTITIONS)}")
    if method == "uniform":
        return split_uniform(num_layers, num_chunks)
    if costs is None:
        raise ValueError(f"partition {method!r} needs the layer costs")
    if len(costs.layers) != num_layers:
        raise ValueError(f"{len(costs.layers)} layer costs given for {num_layers} layers")
    return split_balanced(costs, num_chunks)


def chunk_layers(sizes: Sequence[int]) -> list[range]:
    """The layer indices of each chunk of a split, in model order.

    Args:
        sizes: layers per chunk.
    """
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def stage_chunk_layers(sizes: Sequence[int], stage: int, num_stages: int) -> list[range]:
    """Layers of each local chunk of ``stage``: entry ``c`` is global chunk ``c * pp + stage``.

    Args:
        sizes: layers per chunk; ``len(sizes)`` must be a multiple of ``num_stages``.
        stage: rank in the pipeline group.
        num_stages: pipeline degree ``pp``.
    """
    if len(sizes) % num_stages:
        raise ValueError(f"{len(sizes)} chunks do not divide among {num_stages} stages")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range [0, {num_stages})")
    ranges = chunk_layers(sizes)
    return [ranges[global_chunk_index(stage, c, num_stages)]
            for c in range(len(sizes) // num_stages)]


def _layers_text(layers: range) -> str:
    if len(layers) == 1:
        return str(layers.start)
    return f"{layers.start}-{layers.stop - 1}"


def describe_split(method: str, sizes: Sequence[int], num_stages: int,
                   costs: LayerCosts | None = None) -> str:
    """One line naming each stage's layers, e.g. ``stage 0 [embed 0-1] stage 1 [2-3 head]``.

    With virtual stages each bracket is one chunk.  When costs are given, the
    line ends with the largest chunk cost relative to the mean.

    Args:
        method: the partition method used.
        sizes: layers per chunk.
        num_stages: pipeline degree ``pp``.
        costs: per-piece costs the split was balanced on, if any.
    """
    last = len(sizes) - 1
    parts = []
    for stage in range(num_stages):
        chunks = []
        for c, layers in enumerate(stage_chunk_layers(sizes, stage, num_stages)):
            g = global_chunk_index(stage, c, num_stages)
            words = (["embed"] if g == 0 else []) + [_layers_text(layers)] + (
                ["head"] if g == last else [])
            chunks.append("[" + " ".join(words) + "]")
        parts.append(f"stage {stage} " + " ".join(chunks))
    text = (f"pipeline split ({method}) of {sum(sizes)} layers into {len(sizes)} chunks: "
            + " | ".join(parts))
    if costs is not None:
        per_chunk = chunk_costs(costs, sizes)
        mean = sum(per_chunk) / len(per_chunk)
        if mean > 0:
            text += f"; costliest chunk {max(per_chunk) / mean:.2f}x the mean"
    return text
