"""Horovod start-up for TensorFlow."""
from __future__ import annotations

import os
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


#: Horovod's background cycle (ms) under tensor parallelism, unless the user set one.
TP_CYCLE_TIME_MS = "0.1"


def init_groups(topology: Topology, comm: Any, timeout_sec: float) -> ParallelGroups:
    """Initialise Horovod for TensorFlow and build this rank's groups (collective).

    With tp > 1 the tensor-parallel collectives run inside the step's graph,
    one after another, each waiting for Horovod's next background cycle: the
    default cycle made a small model's tp=2 step 50x slower than a 0.1 ms one
    (``HOROVOD_CYCLE_TIME``; a value the user set is kept).
    """
    if topology.tp > 1:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", TP_CYCLE_TIME_MS)
    return init_horovod_groups(import_horovod(), topology, comm, timeout_sec)
