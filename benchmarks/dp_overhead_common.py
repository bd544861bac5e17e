"""Framework-free helpers shared by the sides of ``dp_overhead.py``."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

#: Environment variables that tune Horovod and Open MPI, reported by each side.
TUNING_PREFIXES = ("HOROVOD_", "OMPI_MCA_mpi_", "OMPI_MCA_btl", "OMPI_MCA_coll")


def hvdllm_config(settings: dict[str, Any], world: int, framework: str) -> Any:
    """The hvdllm config of a run with these settings on ``world`` data-parallel ranks."""
    from hvdllm.common.config import build_config

    return build_config({
        "model": {"n_layer": settings["n_layer"], "n_head": settings["n_head"],
                  "d_model": settings["d_model"], "seq_len": settings["seq_len"],
                  "vocab_size": settings["vocab_size"]},
        "parallel": {"dp": world},
        "train": {"framework": framework, "micro_batch_size": settings["micro_batch"],
                  "global_batch_size": settings["micro_batch"] * settings["accum"] * world,
                  "lr": settings["lr"], "weight_decay": settings["weight_decay"],
                  "beta1": settings["beta1"], "beta2": settings["beta2"],
                  "eps": settings["eps"], "seed": settings["seed"]},
    })


def micro_batches(settings: dict[str, Any], rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's fixed (inputs, targets) micro-batches; identical for every side."""
    rng = np.random.default_rng(settings["seed"] + rank)
    shape = (settings["micro_batch"], settings["seq_len"] + 1)
    out = []
    for _ in range(settings["accum"]):
        tokens = rng.integers(0, settings["vocab_size"], shape, dtype=np.int64)
        out.append((np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])))
    return out


def threads(comm: Any = None) -> int:
    """This rank's intra-op thread count, by hvdllm's own rule.

    Args:
        comm: the world communicator; ``None`` means mpi4py's ``COMM_WORLD``
            (what a peer script would use).  hvdllm's sides pass the one
            from :func:`hvdllm_world`.
    """
    from hvdllm.common.launch import threads_per_rank

    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    return threads_per_rank(comm)


def hvdllm_world() -> Any:
    """The world communicator exactly as ``hvdllm train`` gets it.

    ``hvdllm.common.launch.world_comm`` applies hvdllm's MPI settings
    before MPI starts, so an hvdllm side must call it before anything
    imports ``mpi4py.MPI``.
    """
    from hvdllm.common.launch import world_comm

    return world_comm()


def tuning_env() -> dict[str, str]:
    """The Horovod and Open MPI tuning variables this process runs with."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(TUNING_PREFIXES) and "STALL" not in k}
