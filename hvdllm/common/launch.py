"""Facts about how this process was launched, shared by both adapters."""
from __future__ import annotations

import os
from typing import Any

from . import horovod_backend, watchdog
from .errors import EnvironmentSetupError

BUILD_HINT = ("build it with `make setup` in the hvdllm checkout, or run "
              "`bash scripts/build_horovod.sh` inside your Python environment")


# Open MPI settings applied before MPI starts, unless the user set them.
# Idle ranks yield the CPU instead of spinning: with as many ranks as cores
# (or more), a spinning wait steals cycles from a peer's compute.
MPI_ENV_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def apply_mpi_env_defaults() -> None:
    """Set :data:`MPI_ENV_DEFAULTS` the user has not set; before MPI starts."""
    for key, value in MPI_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def world_comm() -> Any:
    """``MPI.COMM_WORLD``, with a clear error if mpi4py or MPI is missing."""
    apply_mpi_env_defaults()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise EnvironmentSetupError(
            f"mpi4py is not importable ({exc}); install MPI and mpi4py, e.g. `make setup`"
        ) from None
    return MPI.COMM_WORLD


def local_size(comm: Any) -> int:
    """Ranks on this node (shared-memory domain)."""
    env = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("MPI_LOCALNRANKS")
    if env:
        return int(env)
    from mpi4py import MPI

    with watchdog.current().waiting("splitting the world by node", "world",
                                    tuple(range(comm.Get_size()))):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def cores_allowed() -> int:
    """Cores this process may run on: the launcher's binding (``mpirun`` binds
    each of one or two ranks per node to a single core by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(comm: Any) -> int:
    """CPU threads each rank should use so ranks on a node do not oversubscribe.

    The node's cores shared by its ranks, and never more than the cores the
    rank is bound to (more threads than that would only contend).
    """
    return max(1, min((os.cpu_count() or 1) // local_size(comm), cores_allowed()))


def check_launcher(comm: Any) -> None:
    """Catch launches where Horovod and MPI would disagree about the world.

    ``horovodrun --gloo`` starts ranks without MPI, so every process would
    see an MPI world of one and train alone.  hvdllm's groups and
    point-to-point traffic need MPI, so refuse that launch.
    """
    gloo_size = os.environ.get("HOROVOD_SIZE")
    if gloo_size and os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        if int(gloo_size) != comm.Get_size():
            raise EnvironmentSetupError(
                f"launched by horovodrun with Gloo ({gloo_size} ranks) but MPI sees "
                f"{comm.Get_size()}; hvdllm needs MPI: use `horovodrun --mpi` or `mpirun`"
            )


def horovod_missing(framework: str, exc: BaseException) -> EnvironmentSetupError:
    return EnvironmentSetupError(
        f"Horovod with {framework} support is not available ({str(exc).splitlines()[0]}); "
        f"{BUILD_HINT}"
    )


IDLE_CYCLE_TIME_MS = "50"
DP_CYCLE_TIME_MS = "1"


def configure_horovod_env(timeout_sec: float, data_parallel: bool = True,
                          fusion_bytes: int | None = None) -> None:
    """Horovod settings hvdllm relies on; values the user exported win.

    * Deadlines: Horovod's coordinator notices when some ranks submitted a
      tensor and others did not.  It warns (naming the missing ranks) after
      a minute or the deadline, if shorter, and shuts down at twice the
      deadline.  hvdllm's watchdog (:mod:`hvdllm.common.watchdog`) ends a
      hang at the deadline with a fuller report, so Horovod's shutdown is
      the fallback for waits the watchdog does not see; it only works while
      every rank's Horovod thread still runs (a frozen rank stops it).
    * Cycle time 1 ms with data parallelism.  Each gradient bucket waits
      for the next cycle, so a shorter cycle syncs faster (13 MB at dp=2:
      1.9-2.2x raw MPI with 5 ms, 1.15-1.26x with 1 ms, 1.0x once with
      0.2 ms; docs/benchmarks.md), while every cycle costs the Horovod
      thread a negotiation, CPU taken from compute on a busy node.
    * ``fusion_bytes``: Horovod's fusion threshold.  The trainer's torch
      data parallelism packs gradients into buckets itself and passes its
      bucket size, so that two full buckets are never fused: Horovod
      reduces each bucket in place instead of copying it into its fusion
      buffer and back.  Smaller tensors (compressors' factors, norms)
      still fuse.  None keeps Horovod's 64 MB.

    Must run before ``hvd.init()``.
    """
    os.environ.setdefault("HOROVOD_CYCLE_TIME", DP_CYCLE_TIME_MS if data_parallel
                          else IDLE_CYCLE_TIME_MS)
    if fusion_bytes is not None:
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(int(fusion_bytes)))
    deadline = max(1, int(timeout_sec))
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(min(60, deadline)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(2 * deadline))


def start_horovod(hvd: Any, comm: Any, process_sets: Any, timeout: float | None,
                  start_watchdog: bool, default_timeout_sec: float) -> float:
    """``hvd.init(comm, process_sets)`` under hvdllm's deadline and hang watchdog.

    The body of both drop-ins' ``hvd.init``: the deadline (``timeout``, else
    ``$HVDLLM_TIMEOUT_SEC``, else ``default_timeout_sec``), the Open MPI and
    Horovod settings, the watchdog (unless ``start_watchdog`` is False or one
    already runs), then Horovod's start-up as a watched wait.

    Returns:
        The deadline in seconds.
    """
    timeout_sec = float(timeout) if timeout is not None else watchdog.timeout_from_env(
        default_timeout_sec)
    if not timeout_sec > 0:
        raise ValueError(f"init: timeout must be > 0 seconds, got {timeout}")
    apply_mpi_env_defaults()
    configure_horovod_env(timeout_sec)
    if start_watchdog and not watchdog.current().running:
        from mpi4py import MPI

        watchdog.Watchdog(MPI.COMM_WORLD, timeout_sec).start()
    dog = watchdog.current()
    world = tuple(range(dog.size)) if dog.running else ()
    with dog.waiting("Horovod start-up (hvd.init)", "world", world):
        horovod_backend.init(hvd, comm, process_sets, timeout_sec)
    return timeout_sec


def horovod_carries_gradients(train: Any, framework: str) -> bool:
    """Whether the trainer's data-parallel gradients travel through Horovod.

    The dense average of host gradients (the default) is summed with MPI
    directly by both engines (torch: ``GradientSync``'s in-place transport;
    TensorFlow: ``InPlaceSum``), so Horovod's background thread has no
    gradients to negotiate and can keep its idle cycle.  Compression,
    ZeRO-1, Adasum and ``HVDLLM_DP_TRANSPORT=horovod`` (torch) go through
    Horovod.

    Args:
        train: the ``train`` section of the config.
        framework: "torch" or "tensorflow".
    """
    forced = (framework == "torch"
              and os.environ.get("HVDLLM_DP_TRANSPORT", "").strip().lower() == "horovod")
    return (train.compression != "none" or bool(train.zero) or train.reduce_op != "average"
            or forced)


def init_horovod_groups(hvd: Any, topology: Any, comm: Any, timeout_sec: float,
                        fusion_bytes: int | None = None, horovod_dp: bool = True) -> Any:
    """Initialise Horovod with one process set per multi-rank group; build the groups.

    Framework-free: ``hvd`` is the framework's Horovod module
    (``horovod.torch`` or ``horovod.tensorflow``), passed in by the adapter.
    Collective: every rank of ``comm`` must call it with the same topology.

    Args:
        hvd: Horovod module of the framework in use.
        topology: the validated :class:`~hvdllm.common.topology.Topology`.
        comm: mpi4py communicator of the whole job.
        timeout_sec: deadline of each blocking call, Horovod's stall
            shutdown included.
        fusion_bytes: Horovod's fusion threshold with dp > 1 (see
            :func:`configure_horovod_env`); None keeps Horovod's.
        horovod_dp: whether Horovod carries data-parallel gradients (see
            :func:`horovod_carries_gradients`); False keeps its idle cycle
            even with dp > 1.

    Returns:
        This rank's :class:`~hvdllm.common.topology.ParallelGroups`.
    """
    from .topology import build_groups

    dp = topology.dp > 1 and horovod_dp
    configure_horovod_env(timeout_sec, data_parallel=dp, fusion_bytes=fusion_bytes if dp else None)
    psets = {ranks: hvd.ProcessSet(list(ranks)) for ranks in topology.process_set_ranks()}
    world = tuple(range(comm.Get_size()))
    with watchdog.current().waiting("Horovod start-up (hvd.init)", "world", world):
        horovod_backend.init(hvd, comm, list(psets.values()), timeout_sec)
    if hvd.size() != comm.Get_size() or hvd.rank() != comm.Get_rank():
        raise EnvironmentSetupError(
            f"Horovod sees rank {hvd.rank()} of {hvd.size()} but MPI sees rank "
            f"{comm.Get_rank()} of {comm.Get_size()}; launch with horovodrun or mpirun"
        )
    with watchdog.current().waiting("splitting the world into dp, tp and pp communicators",
                                    "world", world):
        return build_groups(topology, comm, timeout_sec=timeout_sec, process_sets=psets,
                            global_process_set=hvd.global_process_set)
