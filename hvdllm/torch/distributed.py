"""Horovod start-up for PyTorch: process sets for the topology's groups."""
from __future__ import annotations

from typing import Any

from ..common.errors import EnvironmentSetupError
from ..common.launch import configure_horovod_deadlines, horovod_missing
from ..common.topology import ParallelGroups, Topology, build_groups


def import_horovod() -> Any:
    """``horovod.torch``, or an :class:`EnvironmentSetupError` saying how to build it."""
    try:
        import horovod.torch as hvd
    except Exception as exc:  # ImportError, or a broken extension
        raise horovod_missing("PyTorch", exc) from None
    return hvd


def init_groups(topology: Topology, comm: Any, timeout_sec: float) -> ParallelGroups:
    """Initialise Horovod with one process set per multi-rank group and build the groups.

    Collective: every rank of ``comm`` must call it with the same topology.
    """
    hvd = import_horovod()
    configure_horovod_deadlines(timeout_sec)
    ranks_lists = topology.process_set_ranks()
    psets = {ranks: hvd.ProcessSet(list(ranks)) for ranks in ranks_lists}
    hvd.init(comm=comm, process_sets=list(psets.values()))
    if hvd.size() != comm.Get_size() or hvd.rank() != comm.Get_rank():
        raise EnvironmentSetupError(
            f"Horovod sees rank {hvd.rank()} of {hvd.size()} but MPI sees rank "
            f"{comm.Get_rank()} of {comm.Get_size()}; launch with horovodrun or mpirun"
        )
    return build_groups(topology, comm, timeout_sec=timeout_sec, process_sets=psets,
                        global_process_set=hvd.global_process_set)
