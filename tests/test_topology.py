"""Tier 1: rank arithmetic of the dp x tp x pp layout."""
import itertools

import pytest

from hvdllm.common.errors import ConfigError
from hvdllm.common.topology import GROUP_KINDS, Topology

LAYOUTS = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2), (3, 2, 4), (2, 4, 3)]


@pytest.mark.parametrize("dp,tp,pp", LAYOUTS)
def test_coords_roundtrip_and_order(dp, tp, pp):
    topo = Topology(dp, tp, pp)
    seen = set()
    for rank in range(topo.world_size):
        d, t, p = topo.coords(rank)
        assert topo.rank_of(d, t, p) == rank
        # Documented order: tp fastest, then dp, then pp.
        assert rank == t + tp * (d + dp * p)
        seen.add((d, t, p))
    assert len(seen) == topo.world_size


@pytest.mark.parametrize("dp,tp,pp", LAYOUTS)
def test_groups_partition_the_world(dp, tp, pp):
    topo = Topology(dp, tp, pp)
    sizes = {"dp": dp, "tp": tp, "pp": pp}
    for kind in GROUP_KINDS:
        groups = topo.all_groups(kind)
        assert len(groups) == topo.world_size // sizes[kind]
        flat = sorted(itertools.chain.from_iterable(groups))
        assert flat == list(range(topo.world_size))
        for ranks in groups:
            assert len(ranks) == sizes[kind]
            for pos, r in enumerate(ranks):
                assert topo.group_ranks(kind, r) == ranks
                coord = {"dp": 0, "tp": 1, "pp": 2}[kind]
                assert topo.coords(r)[coord] == pos
                # Other coordinates are constant inside a group.
                others = [c for i, c in enumerate(topo.coords(r)) if i != coord]
                assert others == [c for i, c in enumerate(topo.coords(ranks[0])) if i != coord]


def test_tp_neighbours_are_adjacent_ranks():
    topo = Topology(2, 4, 2)
    assert topo.group_ranks("tp", 5) == (4, 5, 6, 7)
    assert topo.group_ranks("dp", 5) == (1, 5)
    assert topo.group_ranks("pp", 5) == (5, 13)


def test_world_size_mismatch_names_all_numbers():
    with pytest.raises(ConfigError) as info:
        Topology(2, 1, 1).check_world_size(3)
    msg = str(info.value)
    for text in ("dp=2", "tp=1", "pp=1", "world size 3"):
        assert text in msg


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_degrees_must_be_positive_ints(bad):
    with pytest.raises(ConfigError, match="parallel.dp must be a positive integer"):
        Topology(bad)


def test_process_sets_skip_world_and_singletons():
    assert Topology(4).process_set_ranks() == []
    assert Topology(2, 2, 1).process_set_ranks() == [(0, 2), (1, 3), (0, 1), (2, 3)]
    sets = Topology(2, 2, 2).process_set_ranks()
    assert len(sets) == len(set(sets)) == 4 + 4 + 4


def test_coords_out_of_range():
    with pytest.raises(ValueError):
        Topology(2).coords(2)
    with pytest.raises(ValueError):
        Topology(2).rank_of(2, 0, 0)


def test_neighbours_share_a_group():
    topo = Topology(dp=2, tp=2, pp=2)
    for rank in range(8):
        expected = {r for kind in ("dp", "tp", "pp") for r in topo.group_ranks(kind, rank)}
        assert topo.neighbours(rank) == tuple(sorted(expected - {rank}))
    assert topo.neighbours(0) == (1, 2, 4)
    assert Topology(dp=1).neighbours(0) == ()
