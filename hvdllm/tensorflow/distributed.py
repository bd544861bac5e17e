"""Horovod start-up for TensorFlow."""
from __future__ import annotations

from typing import Any

from ..common.launch import horovod_missing, init_horovod_groups
from ..common.topology import ParallelGroups, Topology


def import_horovod() -> Any:
    """``horovod.tensorflow``, or an :class:`EnvironmentSetupError` saying how to build it."""
    try:
        import horovod.tensorflow as hvd
    except Exception as exc:  # ImportError, or a broken extension
        raise horovod_missing("TensorFlow", exc) from None
    return hvd


def init_groups(topology: Topology, comm: Any, timeout_sec: float) -> ParallelGroups:
    """Initialise Horovod for TensorFlow and build this rank's groups (collective)."""
    return init_horovod_groups(import_horovod(), topology, comm, timeout_sec)
