"""The dp x tp x pp process layout and its communication groups.

Rank order (fastest-varying first): **tp, then dp, then pp**::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

Tensor-parallel peers are therefore neighbouring ranks, which on a real
cluster puts them on the same node where bandwidth is highest; pipeline
stages are the slowest-varying coordinate, so each stage is a contiguous
block of ``dp * tp`` ranks.

:class:`Topology` is pure arithmetic and can be tested without MPI.
:func:`build_groups` turns it into mpi4py sub-communicators and attaches the
Horovod process sets that a framework adapter created for the same ranks.
Nothing here is global: the topology and its groups are passed explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .errors import ConfigError

GROUP_KINDS = ("dp", "tp", "pp")


@dataclass(frozen=True)
class Topology:
    """Parallel degrees; ``dp * tp * pp`` is the world size."""

    dp: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in GROUP_KINDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def check_world_size(self, world_size: int) -> None:
        """Raise :class:`ConfigError` unless ``dp * tp * pp == world_size``."""
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel layout does not match the world: dp={self.dp} x tp={self.tp} x "
                f"pp={self.pp} = {self.world_size}, but the job has world size {world_size}"
            )

    # -- rank arithmetic ---------------------------------------------------
    def rank_of(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        """Global rank of the process at the given coordinates."""
        for name, value, size in (("dp", dp_rank, self.dp), ("tp", tp_rank, self.tp),
                                  ("pp", pp_rank, self.pp)):
            if not 0 <= value < size:
                raise ValueError(f"{name}_rank={value} out of range [0, {size})")
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, tp_rank, pp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range [0, {self.world_size})")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return dp_rank, tp_rank, pp_rank

    def group_ranks(self, kind: str, rank: int) -> tuple[int, ...]:
        """Global ranks of the ``kind`` group ("dp", "tp" or "pp") holding ``rank``.

        The position of a rank in the tuple is its rank inside the group.
        """
        dp_rank, tp_rank, pp_rank = self.coords(rank)
        if kind == "dp":
            return tuple(self.rank_of(d, tp_rank, pp_rank) for d in range(self.dp))
        if kind == "tp":
            return tuple(self.rank_of(dp_rank, t, pp_rank) for t in range(self.tp))
        if kind == "pp":
            return tuple(self.rank_of(dp_rank, tp_rank, p) for p in range(self.pp))
        raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")

    def neighbours(self, rank: int) -> tuple[int, ...]:
        """Every other rank that shares a dp, tp or pp group with ``rank``, sorted."""
        peers = {r for kind in GROUP_KINDS for r in self.group_ranks(kind, rank)}
        return tuple(sorted(peers - {rank}))

    def all_groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every ``kind`` group, ordered by its smallest rank."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world_size):
            seen.setdefault(self.group_ranks(kind, rank), None)
        return sorted(seen, key=lambda ranks: ranks[0])

    def group_index(self, kind: str, rank: int) -> int:
        """Index of ``rank``'s ``kind`` group within :meth:`all_groups`."""
        return self.all_groups(kind).index(self.group_ranks(kind, rank))

    def process_set_ranks(self) -> list[tuple[int, ...]]:
        """Distinct rank lists that need a Horovod process set.

        Groups of one rank need no communication and groups equal to the
        whole world use Horovod's global set, so neither is listed.  Every
        rank gets the same list in the same order, as Horovod requires.
        """
        out: dict[tuple[int, ...], None] = {}
        world = tuple(range(self.world_size))
        for kind in GROUP_KINDS:
            for ranks in self.all_groups(kind):
                if 1 < len(ranks) and ranks != world:
                    out.setdefault(ranks, None)
        return list(out)


@dataclass
class ParallelGroups:
    """The groups one rank belongs to, plus the world group."""

    topology: Topology
    rank: int
    world: Any
    dp: Any
    tp: Any
    pp: Any

    @property
    def coords(self) -> tuple[int, int, int]:
        return self.topology.coords(self.rank)


def build_groups(topology: Topology, world_comm: Any, *, timeout_sec: float,
                 process_sets: Mapping[tuple[int, ...], Any] | None = None,
                 global_process_set: Any = None,
                 group_factory: Callable[..., Any] | None = None) -> ParallelGroups:
    """Split ``world_comm`` into this rank's dp, tp and pp groups.

    Collective over ``world_comm``: every rank must call it.

    Args:
        topology: validated layout; must match ``world_comm``'s size.
        world_comm: an mpi4py intracommunicator holding every rank.
        timeout_sec: deadline of each blocking call on the groups.
        process_sets: Horovod process sets keyed by their global ranks, as
            listed by :meth:`Topology.process_set_ranks`.
        global_process_set: Horovod's process set for the whole world.
        group_factory: constructor of the group objects; defaults to
            :class:`hvdllm.common.comm.Group`.
    """
    from .comm import Group

    make = group_factory or Group
    topology.check_world_size(world_comm.Get_size())
    rank = world_comm.Get_rank()
    process_sets = dict(process_sets or {})
    world_ranks = tuple(range(topology.world_size))
    world = make("world", world_comm, world_ranks, timeout_sec=timeout_sec,
                 process_set=global_process_set)
    groups: dict[str, Any] = {}
    for kind in GROUP_KINDS:
        ranks = topology.group_ranks(kind, rank)
        color = topology.group_index(kind, rank)
        sub = world_comm.Split(color, ranks.index(rank))
        if ranks == world_ranks:
            pset = global_process_set
        else:
            pset = process_sets.get(ranks)
        groups[kind] = make(kind, sub, ranks, timeout_sec=timeout_sec, process_set=pset)
    return ParallelGroups(topology=topology, rank=rank, world=world, **groups)


def describe(topology: Topology, rank: int) -> str:
    """One line naming a rank's coordinates, for logs."""
    dp_rank, tp_rank, pp_rank = topology.coords(rank)
    return (f"rank {rank}: dp {dp_rank}/{topology.dp} tp {tp_rank}/{topology.tp} "
            f"pp {pp_rank}/{topology.pp}")


def ranks_str(ranks: Sequence[int]) -> str:
    return "[" + ",".join(str(r) for r in ranks) + "]"
