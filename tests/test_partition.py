"""Tier 1: the pipeline split arithmetic of hvdllm.common.partition, no framework and no MPI.

The balanced split is checked against brute force over every way of cutting
small models, so the dynamic programme is held to the exact optimum (its
largest chunk cost, then its sum of squares).
"""
import itertools
import random

import pytest

from hvdllm.common.partition import (
    PARTITIONS,
    LayerCosts,
    chunk_costs,
    chunk_layers,
    describe_split,
    split_balanced,
    split_layers,
    split_uniform,
    stage_chunk_layers,
)
from hvdllm.common.schedules import chunk_location, global_chunk_index


def all_splits(num_layers, num_chunks):
    """Every composition of num_layers into num_chunks positive parts."""
    for cuts in itertools.combinations(range(1, num_layers), num_chunks - 1):
        edges = (0,) + cuts + (num_layers,)
        yield tuple(b - a for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("n,k", [(n, k) for n in range(1, 13) for k in range(1, n + 1)])
def test_uniform_sizes_are_even_and_front_loaded(n, k):
    sizes = split_uniform(n, k)
    assert len(sizes) == k and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert list(sizes) == sorted(sizes, reverse=True)


def test_uniform_examples():
    assert split_uniform(8, 4) == (2, 2, 2, 2)
    assert split_uniform(5, 2) == (3, 2)
    assert split_uniform(7, 3) == (3, 2, 2)


@pytest.mark.parametrize("n,k", [(0, 1), (3, 0), (3, 4), (2.0, 1)])
def test_bad_counts_are_refused(n, k):
    with pytest.raises(ValueError):
        split_uniform(n, k)


def test_balanced_matches_brute_force():
    rng = random.Random(7)
    for trial in range(300):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = LayerCosts(tuple(float(rng.randint(1, 9)) for _ in range(n)),
                           embedding=float(rng.randint(0, 12)), head=float(rng.randint(0, 12)))
        got = split_balanced(costs, k)
        assert sum(got) == n and len(got) == k and min(got) >= 1
        candidates = [(max(chunk_costs(costs, s)), sum(c * c for c in chunk_costs(costs, s)))
                      for s in all_splits(n, k)]
        best = min(candidates)
        got_cost = chunk_costs(costs, got)
        assert max(got_cost) == best[0], (trial, costs, got)
        assert sum(c * c for c in got_cost) == best[1], (trial, costs, got)


def test_balanced_moves_layers_away_from_a_costly_head():
    costs = LayerCosts((1.0,) * 8, embedding=0.0, head=4.0)
    assert split_balanced(costs, 2) == (6, 2)  # chunk costs 6 and 2 + 4
    # A costly embedding pushes layers the other way.
    assert split_balanced(LayerCosts((1.0,) * 8, embedding=4.0, head=0.0), 2) == (2, 6)


def test_balanced_equal_costs_is_uniform():
    for n, k in [(8, 4), (12, 3), (6, 6), (9, 3)]:
        assert split_balanced(LayerCosts((2.5,) * n), k) == split_uniform(n, k)


def test_balanced_uneven_layers():
    # One heavy layer in the middle gets a chunk of its own.
    costs = LayerCosts((1.0, 1.0, 10.0, 1.0, 1.0))
    assert split_balanced(costs, 3) == (2, 1, 2)


def test_split_layers_dispatches_and_checks():
    costs = LayerCosts((1.0,) * 4, head=2.0)
    assert split_layers("uniform", 2, 4) == (2, 2)
    assert split_layers("parameters", 2, 4, costs) == (3, 1)
    assert split_layers("balanced", 2, 4, costs) == (3, 1)
    assert set(PARTITIONS) == {"uniform", "parameters", "balanced"}
    with pytest.raises(ValueError, match="unknown partition"):
        split_layers("random", 2, 4)
    with pytest.raises(ValueError, match="needs the layer costs"):
        split_layers("balanced", 2, 4)
    with pytest.raises(ValueError, match="3 layer costs given for 4 layers"):
        split_layers("parameters", 2, 4, LayerCosts((1.0,) * 3))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_layer_costs_reject_bad_values(bad):
    with pytest.raises(ValueError):
        LayerCosts((1.0, bad))
    with pytest.raises(ValueError):
        LayerCosts((1.0,), head=bad)
    with pytest.raises(ValueError):
        LayerCosts(())


def test_chunk_costs_add_embedding_and_head():
    costs = LayerCosts((1.0, 2.0, 3.0, 4.0), embedding=10.0, head=100.0)
    assert chunk_costs(costs, (1, 3)) == (11.0, 109.0)
    assert chunk_costs(costs, (4,)) == (120.0,)
    with pytest.raises(ValueError):
        chunk_costs(costs, (2, 1))


@pytest.mark.parametrize("p,v", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
def test_stage_chunks_follow_global_chunk_index(p, v):
    n = 2 * p * v + 1
    sizes = split_uniform(n, p * v)
    ranges = chunk_layers(sizes)
    assert [i for r in ranges for i in r] == list(range(n))
    seen = []
    for stage in range(p):
        local = stage_chunk_layers(sizes, stage, p)
        assert len(local) == v
        for c, layers in enumerate(local):
            g = global_chunk_index(stage, c, p)
            assert chunk_location(g, p) == (stage, c)
            assert layers == ranges[g]
            seen.extend(layers)
    assert sorted(seen) == list(range(n))


def test_stage_chunks_check_arguments():
    with pytest.raises(ValueError):
        stage_chunk_layers((1, 1, 1), 0, 2)
    with pytest.raises(ValueError):
        stage_chunk_layers((1, 1), 2, 2)


def test_describe_split():
    assert describe_split("uniform", (2, 2), 2) == (
        "pipeline split (uniform) of 4 layers into 2 chunks: stage 0 [embed 0-1] | "
        "stage 1 [2-3 head]")
    text = describe_split("balanced", (1, 2, 1, 1), 2, LayerCosts((1.0,) * 5, 1.0, 1.0))
    assert "stage 0 [embed 0] [3] | stage 1 [1-2] [4 head]" in text
    assert text.endswith("costliest chunk 1.14x the mean")  # 2 of 7/4
