"""Run under mpirun: every Group collective and point-to-point over all groups.

Usage: comm_check.py DP TP PP.  Expectations are computed from the ranks;
any mismatch raises, which fails this rank and therefore the job.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

from hvdllm.common.errors import CommError, CommTimeoutError
from hvdllm.common.topology import Topology, build_groups

dp, tp, pp = (int(a) for a in sys.argv[1:4])
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
topo = Topology(dp, tp, pp)
groups = build_groups(topo, comm, timeout_sec=30.0)

for kind in ("world", "dp", "tp", "pp"):
    g = getattr(groups, kind)
    expect_ranks = tuple(range(size)) if kind == "world" else topo.group_ranks(kind, rank)
    assert g.ranks == expect_ranks, (kind, g.ranks, expect_ranks)
    assert g.global_rank == rank
    members = np.array(g.ranks, dtype=np.float64)

    # allreduce: sum / mean / max / min of the global ranks
    x = np.array([rank, 2.0 * rank], dtype=np.float64)
    np.testing.assert_allclose(g.allreduce(x, "sum"), [members.sum(), 2 * members.sum()])
    np.testing.assert_allclose(g.allreduce(x, "mean"), [members.mean(), 2 * members.mean()])
    assert g.allreduce(np.array([rank], np.int64), "max")[0] == max(g.ranks)
    assert g.allreduce(np.array([rank], np.int64), "min")[0] == min(g.ranks)

    # allgather: row i comes from group rank i
    got = g.allgather(np.full((2, 3), rank, np.int32))
    assert got.shape == (g.size, 2, 3)
    assert [int(row[0, 0]) for row in got] == list(g.ranks)

    # broadcast from each root
    for root in range(g.size):
        out = g.broadcast(np.full(4, rank, np.float32), root=root)
        assert (out == g.ranks[root]).all()
    assert g.broadcast_object({"from": rank}, root=g.size - 1) == {"from": g.ranks[-1]}

    # reduce_scatter: rank i gets the reduced i-th chunk
    contrib = np.arange(g.size * 3, dtype=np.float64) * (rank + 1)
    chunk = g.reduce_scatter(contrib, "sum")
    full = np.arange(g.size * 3, dtype=np.float64) * (members + 1).sum()
    np.testing.assert_allclose(chunk, full[g.rank * 3:(g.rank + 1) * 3])

    # point-to-point ring with shape/dtype checks
    if g.size > 1:
        right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
        payload = np.arange(6, dtype=np.float32).reshape(2, 3) + rank
        op = g.isend(payload, right, tag=3)
        got = g.recv(left, tag=3, shape=(2, 3), dtype=np.float32)
        op.wait()
        np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3) + g.ranks[left])

        # A receiver that expects another shape gets an error naming both ranks.
        op = g.isend(np.zeros((2, 3), np.float32), right, tag=4)
        try:
            g.recv(left, tag=4, shape=(3, 3), dtype=np.float32)
        except CommError as exc:
            msg = str(exc)
            assert f"global rank {rank} expected float32[3,3]" in msg, msg
            assert f"global rank {g.ranks[left]} sent float32[2,3]" in msg, msg
        else:
            raise AssertionError("shape mismatch not detected")
        op.wait()
        op = g.isend(np.zeros(5, np.int64), right, tag=5)
        try:
            g.recv(left, tag=5, shape=(5,), dtype=np.float32)
        except CommError as exc:
            assert "expected float32[5]" in str(exc) and "sent int64[5]" in str(exc), str(exc)
        else:
            raise AssertionError("dtype mismatch not detected")
        op.wait()
    groups.world.barrier()

# A peer that never sends: the receiver fails with a named timeout, not a hang.
if size > 1:
    short = build_groups(topo, comm, timeout_sec=1.0).world
    if rank == 0:
        t0 = time.monotonic()
        try:
            short.recv(1, tag=99)
        except CommTimeoutError as exc:
            msg = str(exc)
            assert "recv (tag 99)" in msg and "global rank 0 with global rank(s) 1" in msg, msg
            assert time.monotonic() - t0 < 10
        else:
            raise AssertionError("missing sender not detected")
    comm.Barrier()
print(f"rank {rank}: comm checks passed", flush=True)
