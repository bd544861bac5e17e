"""Horovod start-up for PyTorch."""
from __future__ import annotations

from typing import Any

from ..common.launch import horovod_missing, init_horovod_groups
from ..common.topology import ParallelGroups, Topology


def import_horovod() -> Any:
    """``horovod.torch``, or an :class:`EnvironmentSetupError` saying how to build it."""
    try:
        import horovod.torch as hvd
    except Exception as exc:  # ImportError, or a broken extension
        raise horovod_missing("PyTorch", exc) from None
    return hvd


def init_groups(topology: Topology, comm: Any, timeout_sec: float) -> ParallelGroups:
    """Initialise Horovod for torch and build this rank's groups (collective).

    Horovod's fusion threshold is set to the data-parallel bucket size, so
    that it reduces every full bucket in place (see
    :func:`hvdllm.common.launch.configure_horovod_env`).
    """
    from .data_parallel import DEFAULT_BUCKET_BYTES

    return init_horovod_groups(import_horovod(), topology, comm, timeout_sec,
                               fusion_bytes=DEFAULT_BUCKET_BYTES)
