"""Shared set-up of the dpx_* checks: Horovod with the process sets of several layouts.

One launch can then test a component on, say, a world-sized DP group and
on the two DP groups of a dp=2 x tp=2 layout.
"""
import numpy as np
from mpi4py import MPI

from hvdllm.common.launch import configure_horovod_env
from hvdllm.common.topology import Topology, build_groups
from hvdllm.torch.distributed import import_horovod

TIMEOUT_SEC = 60.0


def init_layouts(layouts):
    """Initialise Horovod once for every (dp, tp, pp) in ``layouts``; return hvd, comm, groups."""
    comm = MPI.COMM_WORLD
    hvd = import_horovod()
    topologies = [Topology(*layout) for layout in layouts]
    ranks = {}
    for topo in topologies:
        for r in topo.process_set_ranks():
            ranks.setdefault(r, None)
    configure_horovod_env(TIMEOUT_SEC)
    psets = {r: hvd.ProcessSet(list(r)) for r in ranks}
    hvd.init(comm=comm, process_sets=list(psets.values()))
    groups = [build_groups(topo, comm, timeout_sec=TIMEOUT_SEC, process_sets=psets,
                           global_process_set=hvd.global_process_set) for topo in topologies]
    return hvd, comm, groups


def gather(group, tensor):
    """Every group rank's copy of ``tensor`` as a float64 array with a leading rank axis."""
    return group.allgather(tensor.detach().double().numpy())


def same_on_all_ranks(group, tensor, what):
    copies = gather(group, tensor)
    assert all(np.array_equal(copies[0], c) for c in copies[1:]), f"{what} differs across ranks"
