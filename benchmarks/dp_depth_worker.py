"""Worker of ``dp_depth.py`` (run under mpirun): ZeRO-1 memory, or DP overlap timing.

argv[1] = "memory": build the demo model's engine with ``train.zero = 0``
and ``1``, take one step, and report optimizer-state bytes on rank 0.
argv[1] = "overlap": time the overlapped gradient sync against the same
sync started after backward.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from hvdllm.common.config import load_config
from hvdllm.common.launch import world_comm
from hvdllm.common.topology import Topology
from hvdllm.torch.distributed import init_groups
from hvdllm.torch.engine import build_engine


def demo_config(comm, *extra: str):
    return load_config("configs/demo.toml", [f"parallel.dp={comm.Get_size()}",
                                             f"train.micro_batch_size={16 // comm.Get_size()}",
                                             *extra])


def batches(cfg, rank):
    rng = np.random.default_rng(rank)
    x = rng.integers(0, 256, (cfg.train.micro_batch_size, cfg.model.seq_len), dtype=np.int64)
    return [(x, np.roll(x, -1, axis=1))]


def memory(comm, groups) -> dict:
    out = {}
    for zero in (0, 1):
        cfg = demo_config(comm, f"train.zero={zero}")
        engine = build_engine(cfg, groups, threads=1)
        engine.train_step(batches(cfg, comm.Get_rank()), 1e-3)
        opt = engine.update.optimizer
        if zero:
            out["zero_moment_bytes"] = (opt.exp_avg.numel() + opt.exp_avg_sq.numel()) * 4
            out["zero_master_bytes"] = opt.master.numel() * 4
        else:
            out["unsharded_bytes"] = sum(t.numel() * t.element_size()
                                         for st in opt.state.values() for k, t in st.items()
                                         if k in ("exp_avg", "exp_avg_sq"))
    return out


def overlap(comm, groups) -> dict:
    cfg = demo_config(comm)
    engine = build_engine(cfg, groups, threads=1)
    sync = engine.update.sync
    model = engine.model
    micro = batches(cfg, comm.Get_rank())
    x, y = (torch.from_numpy(a) for a in micro[0])
    exposed, whole = [], []
    for trial in range(12):
        sync.zero_grad()  # the gradients are views into the buckets: zeroed, never dropped
        with sync.sync():
            model.loss(x, y).backward()
        start = time.perf_counter()
        sync.wait()
        exposed.append(time.perf_counter() - start)
        sync.zero_grad()
        model.loss(x, y).backward()
        comm.Barrier()
        start = time.perf_counter()
        sync.wait()  # nothing started in backward: every bucket goes now
        whole.append(time.perf_counter() - start)
    return {"exposed_ms": statistics.median(exposed[2:]) * 1e3,
            "whole_ms": statistics.median(whole[2:]) * 1e3}


def main() -> None:
    comm = world_comm()
    torch.set_num_threads(1)
    groups = init_groups(Topology(comm.Get_size()), comm, 300.0)
    result = memory(comm, groups) if sys.argv[1] == "memory" else overlap(comm, groups)
    if comm.Get_rank() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
