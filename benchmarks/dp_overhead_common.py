"""Framework-free helpers shared by the sides of ``dp_overhead.py``."""
from __future__ import annotations

from typing import Any

import numpy as np


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


def threads() -> int:
    """This rank's intra-op thread count, by hvdllm's own rule."""
    from mpi4py import MPI

    from hvdllm.common.launch import threads_per_rank

    return threads_per_rank(MPI.COMM_WORLD)
