"""One side of ``tp_speed.py``: time training steps of the same LLaMA model.

Sides (argv[1]):

* ``hvdllm``: hvdllm's engine, built as ``hvdllm train`` builds it, at the
  tp given by the world size (1 process, or ``mpirun -np 2``);
* ``dtensor``: the same model class and weights with PyTorch's own
  ``torch.distributed.tensor.parallel`` (DTensor over gloo), Megatron plan
  on the blocks (q, k, v, gate, up column-wise; o, down row-wise), the same
  AdamW, under ``mpirun -np 2``.

argv[2] is a JSON object of settings; the worker prints one JSON line with
the step times (seconds) on rank 0.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

SETTINGS = json.loads(sys.argv[2])


def overrides(tp: int) -> list[str]:
    s = SETTINGS
    return [f"parallel.tp={tp}", "parallel.dp=1", "model.family=llama",
            f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}",
            f"model.d_model={s['d_model']}", f"model.seq_len={s['seq_len']}",
            f"train.global_batch_size={s['batch']}", f"train.micro_batch_size={s['batch']}",
            "train.lr=1e-4"]


def batch():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (SETTINGS["batch"], SETTINGS["seq_len"]), dtype=np.int64)
    return x, np.roll(x, -1, axis=1)


def time_steps(step) -> list[float]:
    times = []
    for i in range(SETTINGS["warmup"] + SETTINGS["steps"]):
        start = time.perf_counter()
        step()
        if i >= SETTINGS["warmup"]:
            times.append(time.perf_counter() - start)
    return times


def run_hvdllm() -> tuple[int, list[float]]:
    import torch

    from hvdllm.common.config import build_config
    from hvdllm.common.launch import world_comm
    from hvdllm.common.topology import Topology
    from hvdllm.torch.distributed import init_groups
    from hvdllm.torch.engine import build_engine

    comm = world_comm()
    size = comm.Get_size()
    cfg = build_config({}, overrides(size))
    groups = init_groups(Topology(1, size, 1), comm, 300.0)
    engine = build_engine(cfg, groups, threads=SETTINGS["threads"])
    torch.set_num_threads(SETTINGS["threads"])
    micro = [batch()]
    return comm.Get_rank(), time_steps(lambda: engine.train_step(micro, 1e-4))


def run_dtensor() -> tuple[int, list[float]]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    from hvdllm.common.config import build_config
    from hvdllm.torch.engine import build_model, build_optimizer

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(SETTINGS["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(SETTINGS["threads"])
    cfg = build_config({}, overrides(1))
    model = build_model(cfg)
    mesh = init_device_mesh("cpu", (size,))
    plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel()}
    for block in model.blocks.values():
        parallelize_module(block, mesh, plan)
    opt = build_optimizer(model, cfg)
    x, y = (torch.from_numpy(a) for a in batch())

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        opt.step()

    times = time_steps(step)
    dist.destroy_process_group()
    return rank, times


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(SETTINGS["threads"]))
    rank, times = run_hvdllm() if sys.argv[1] == "hvdllm" else run_dtensor()
    if rank == 0:
        print(json.dumps({"median": statistics.median(times), "times": times}), flush=True)


if __name__ == "__main__":
    main()
