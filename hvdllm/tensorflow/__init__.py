"""TensorFlow/Keras 3 adapter: models, data-parallel gradient sync and the training engine.

It is also a drop-in replacement for ``horovod.tensorflow``::

    import hvdllm.tensorflow as hvd     # instead of: import horovod.tensorflow as hvd

offers Horovod's names (``init``, ``rank``, ``allreduce``,
``broadcast_variables``, ``DistributedGradientTape``, ``Compression``, ...),
working on Keras 3 variables, plus hvdllm's compressions
``Compression.bf16``, ``Compression.topk(ratio)`` and
``Compression.powersgd(rank)``; see :mod:`hvdllm.tensorflow.hvd_compat`.

Horovod (and TensorFlow) are imported only when one of those names is first
used, so the rest of this package imports without them (the capability
declarations stay framework-free), and a missing Horovod shows up as a
clean error where it is needed.
"""
from __future__ import annotations

from typing import Any

# horovod.tensorflow's public API (Horovod 0.28), served by hvd_compat.
HOROVOD_API = frozenset("""
    init shutdown is_initialized size local_size cross_size rank local_rank cross_rank
    is_homogeneous rank_op local_rank_op size_op local_size_op process_set_included_op
    allreduce grouped_allreduce allgather grouped_allgather broadcast broadcast_ alltoall
    reducescatter grouped_reducescatter broadcast_object broadcast_object_fn allgather_object
    join barrier start_timeline stop_timeline
    broadcast_variables broadcast_global_variables
    DistributedGradientTape PartialDistributedGradientTape DistributedOptimizer
    LocalGradientAggregationHelper SyncBatchNormalization Compression
    ProcessSet global_process_set add_process_set remove_process_set
    Average Sum Adasum Min Max Product
    mpi_threads_supported mpi_enabled mpi_built gloo_enabled gloo_built nccl_built ddl_built
    ccl_built cuda_built rocm_built gpu_available check_num_rank_power_of_2 elastic
""".split())


def __getattr__(name: str) -> Any:
    if name in HOROVOD_API:
        from . import hvd_compat

        return getattr(hvd_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | HOROVOD_API)
