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


def init_groups(topology: Topology, comm: Any, timeout_sec: float,
                horovod_dp: bool = True) -> ParallelGroups:
    """Initialise Horovod for TensorFlow and build this rank's groups (collective).

    With tp > 1 the tensor-parallel collectives run inside the step's graph,
    one after another, each waiting for Horovod's next background cycle: the
    default cycle made a small model's tp=2 step 50x slower than a 0.1 ms one
    (``HOROVOD_CYCLE_TIME``; a value the user set is kept).  ``horovod_dp``
    False (the trainer's in-place DP sum, which Horovod does not carry)
    keeps Horovod's idle cycle with dp > 1; with a GPU visible the engine
    reduces through Horovod, so it is ignored there.
    """
    if topology.tp > 1:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", TP_CYCLE_TIME_MS)
    if not horovod_dp:
        import tensorflow as tf

        # Physical devices: listing them leaves the runtime (and the thread
        # pools the engine sizes later) uninitialised.
        horovod_dp = bool(tf.config.list_physical_devices("GPU"))
    return init_horovod_groups(import_horovod(), topology, comm, timeout_sec,
                               horovod_dp=horovod_dp)
