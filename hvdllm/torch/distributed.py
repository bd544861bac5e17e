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


def init_groups(topology: Topology, comm: Any, timeout_sec: float,
                horovod_dp: bool = True) -> ParallelGroups:
    """Initialise Horovod for torch and build this rank's groups (collective).

    When Horovod carries the data-parallel gradients (``horovod_dp``; the
    trainer passes :func:`hvdllm.common.launch.horovod_carries_gradients`),
    its fusion threshold is the bucket size, so that it reduces every full
    bucket in place, and its cycle is the short data-parallel one (see
    :func:`hvdllm.common.launch.configure_horovod_env`).
    """
    from .data_parallel import DEFAULT_BUCKET_BYTES

    return init_horovod_groups(import_horovod(), topology, comm, timeout_sec,
                               fusion_bytes=DEFAULT_BUCKET_BYTES, horovod_dp=horovod_dp)
