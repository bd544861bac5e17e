"""One side of ``pp_speed.py``: time training steps of one LLaMA model, split or not.

Sides (argv[1]):

* ``single``: hvdllm's engine on one process (pp=1), the step's
  micro-batches accumulated, with the thread count given;
* ``hvdllm``: hvdllm's engine at pp=2 under ``mpirun -np 2``, built as
  ``hvdllm train`` builds it (Horovod groups, 1 thread per rank), with the
  schedule given.  Each stage also reports how long it computed (forward
  and backward, minus the time waiting for messages inside them), from
  which the bubble is measured;
* ``torch``: ``torch.distributed.pipelining`` (``Schedule1F1B`` over gloo)
  with the same model, the same two stages (hvdllm's uniform split) and
  the same micro-batches, and the same AdamW;
* ``memory``: hvdllm at pp=2, one step per schedule under a
  :class:`~hvdllm.torch.pipeline.SavedTensorMeter`: peak bytes of saved
  activations per stage.

argv[2] is a JSON object of settings.  Multi-rank steps start after an MPI
barrier and a step's time is the slowest rank's.  Rank 0 prints one JSON line.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

SETTINGS = json.loads(sys.argv[2])


def overrides(pp: int, schedule: str = "1f1b", virtual_stages: int = 1) -> list[str]:
    s = SETTINGS
    return [f"parallel.pp={pp}", "parallel.dp=1", "model.family=llama",
            f"parallel.schedule={schedule}", f"parallel.virtual_stages={virtual_stages}",
            f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}",
            f"model.d_model={s['d_model']}", f"model.seq_len={s['seq_len']}",
            f"train.global_batch_size={s['micro_batch'] * s['microbatches']}",
            f"train.micro_batch_size={s['micro_batch']}", "train.lr=1e-4"]


def micro_batches() -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    s = SETTINGS
    x = rng.integers(0, 256, (s["microbatches"], s["micro_batch"], s["seq_len"] + 1),
                     dtype=np.int64)
    return [(t[:, :-1].copy(), t[:, 1:].copy()) for t in x]


def time_steps(step, comm=None) -> list[float]:
    """Step times after warm-up; with ``comm``, barrier first and keep the slowest rank's."""
    times = []
    for i in range(SETTINGS["warmup"] + SETTINGS["steps"]):
        if comm is not None:
            comm.Barrier()
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if comm is not None:
            elapsed = max(comm.allgather(elapsed))
        if i >= SETTINGS["warmup"]:
            times.append(elapsed)
    return times


def hvdllm_engine(pp: int, schedule: str = "1f1b", virtual_stages: int = 1, groups=None):
    from hvdllm.common.config import build_config
    from hvdllm.common.launch import threads_per_rank, world_comm
    from hvdllm.common.topology import Topology
    from hvdllm.torch.distributed import init_groups
    from hvdllm.torch.engine import build_engine

    comm = world_comm()
    if groups is None:
        groups = init_groups(Topology(1, 1, pp), comm, 300.0)
    threads = SETTINGS["threads"] if pp == 1 else threads_per_rank(comm)
    cfg = build_config({}, overrides(pp, schedule, virtual_stages))
    return comm, groups, build_engine(cfg, groups, threads=threads)


def run_single() -> dict:
    _, _, engine = hvdllm_engine(1)
    micro = micro_batches()
    return {"times": time_steps(lambda: engine.train_step(micro, 1e-4))}


class _ComputeClock:
    """Time a stage spends in forward and backward, less its waits for messages there."""

    def __init__(self, executor) -> None:
        from hvdllm.torch.pipeline import p2p

        self.compute = 0.0
        self.pipeline = 0.0
        clock = self
        for name in ("_forward", "_backward", "train_step"):
            setattr(executor, name, self._timed(getattr(executor, name), name == "train_step"))
        wait = p2p.RecvHandle.wait

        def timed_wait(handle):
            start = time.perf_counter()
            try:
                return wait(handle)
            finally:
                clock.compute -= time.perf_counter() - start
        p2p.RecvHandle.wait = timed_wait

    def _timed(self, fn, whole_step: bool):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if whole_step:
                    self.pipeline += elapsed
                else:
                    self.compute += elapsed
        return run


def run_hvdllm() -> dict:
    comm, _, engine = hvdllm_engine(2, SETTINGS["schedule"], SETTINGS["virtual_stages"])
    clock = _ComputeClock(engine.pipeline)
    micro = micro_batches()
    times = time_steps(lambda: engine.train_step(micro, 1e-4), comm)
    # Idle share of each stage over all steps (warm-up included on both sides of the ratio).
    busy = comm.allgather((clock.compute, clock.pipeline))
    return {"times": times, "stage_bubble": [1 - c / p for c, p in busy],
            "split": engine.describe()[0]}


def run_memory() -> dict:
    from hvdllm.torch.pipeline import SavedTensorMeter

    groups, out = None, {}
    micro = micro_batches()
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        comm, groups, engine = hvdllm_engine(2, schedule, v, groups)
        engine.train_step(micro, 1e-4)  # warm-up
        meter = SavedTensorMeter(engine.model.parameters())
        with meter.watch():
            engine.train_step(micro, 1e-4)
        out[f"{schedule}_v{v}"] = comm.allgather(meter.peak_bytes)
    return out


def run_torch() -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from mpi4py import MPI
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from hvdllm.common.config import build_config
    from hvdllm.common.partition import split_uniform
    from hvdllm.torch.engine import build_model, build_optimizer
    from hvdllm.torch.pipeline import cut_stage

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(SETTINGS["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    cfg = build_config({}, overrides(1))
    model = build_model(cfg)
    chunk = cut_stage(model, split_uniform(cfg.model.n_layer, size), rank, size)[0]

    class Stage(nn.Module):
        """Embedding (first stage), this stage's blocks, and the head (last stage)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = model.embed(x) if chunk.first else x
            for key in chunk.keys:
                x = model.run_block(key, x)
            return model.head(x) if chunk.last else x

    stage_module = Stage()
    stage = PipelineStage(stage_module, rank, size, torch.device("cpu"))
    schedule = Schedule1F1B(stage, SETTINGS["microbatches"], loss_fn=model.criterion)
    opt = build_optimizer(model, cfg)
    micro = micro_batches()
    x = torch.from_numpy(np.concatenate([a for a, _ in micro]))
    y = torch.from_numpy(np.concatenate([b for _, b in micro]))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if chunk.first:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=[])
        opt.step()

    times = time_steps(step, comm)
    dist.destroy_process_group()
    return {"times": times}


def main() -> None:
    side = sys.argv[1]
    os.environ.setdefault("OMP_NUM_THREADS", str(SETTINGS["threads"]))
    result = {"single": run_single, "hvdllm": run_hvdllm, "torch": run_torch,
              "memory": run_memory}[side]()
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        if "times" in result:
            result["median"] = statistics.median(result["times"])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
