"""PyTorch adapter: models, data-parallel gradient sync and the training engine.

It is also a drop-in replacement for ``horovod.torch``::

    import hvdllm.torch as hvd     # instead of: import horovod.torch as hvd

offers Horovod's names (``init``, ``rank``, ``DistributedOptimizer``,
``broadcast_parameters``, ``allreduce``, ``Compression``, ...) plus hvdllm's
compressions ``Compression.bf16``, ``Compression.topk(ratio)`` and
``Compression.powersgd(rank)``; see :mod:`hvdllm.torch.hvd_compat`.

Horovod is imported only when one of those names is first used, so the rest
of this package (the engine, the models) imports without Horovod, and a
missing Horovod shows up as a clean error where it is needed.
"""
from __future__ import annotations

from typing import Any

# horovod.torch's public API (Horovod 0.28), served by hvd_compat.
HOROVOD_API = frozenset("""
    init shutdown is_initialized size local_size cross_size rank local_rank cross_rank
    DistributedOptimizer Compression broadcast_parameters broadcast_optimizer_state
    broadcast_object allgather_object
    allreduce allreduce_async allreduce_ allreduce_async_ grouped_allreduce
    grouped_allreduce_async grouped_allreduce_ grouped_allreduce_async_ sparse_allreduce_async
    allgather allgather_async grouped_allgather grouped_allgather_async
    broadcast broadcast_async broadcast_ broadcast_async_ alltoall alltoall_async
    reducescatter reducescatter_async grouped_reducescatter grouped_reducescatter_async
    join barrier poll synchronize start_timeline stop_timeline
    mpi_threads_supported mpi_enabled mpi_built gloo_enabled gloo_built nccl_built ddl_built
    ccl_built cuda_built rocm_built
    ProcessSet global_process_set add_process_set remove_process_set
    Average Sum Adasum Min Max Product HorovodInternalError SyncBatchNorm elastic
""".split())


def __getattr__(name: str) -> Any:
    if name in HOROVOD_API:
        from . import hvd_compat

        return getattr(hvd_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | HOROVOD_API)
