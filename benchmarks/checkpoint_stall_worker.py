"""Worker of ``checkpoint_stall.py`` (run under ``mpirun -np 2``): save stalls of one model.

argv[1] is a JSON object of settings (the model's ``--set`` items, the
micro-batch, repetition counts, a scratch directory).  The worker

1. builds the torch engine as ``hvdllm train`` does (``world_comm`` first,
   ``init_groups``, ``build_engine`` with ``threads_per_rank``) and times
   training steps (slowest rank, after a barrier) with nothing in flight:
   ``steps`` after ``warmup_steps``, and 2 more at the end;
2. times, on every rank, what a save costs the training thread: hvdllm's
   ``engine.capture_state(manager.new_state())`` + ``CheckpointManager.save(...)`` (as
   ``RunCheckpoints._save`` does it), against
   ``torch.distributed.checkpoint.async_save`` of the model's and the
   optimizer's ``state_dict()`` over a gloo process group of the same ranks.
   Each save is waited for (``manager.wait()``, ``future.result()``) before
   the next one, untimed; the two sides alternate, and the side that goes
   first flips every repetition.  The first repetition of each is warm-up.
3. copies the same tensors with plain numpy on rank 0 (into fresh buffers,
   as ``capture_state`` does, and into buffers kept from the previous copy):
   the floor under ``capture_state``;
4. times one training step started right after each side's save returned,
   while that save is still being written in the background.

Rank 0 prints one JSON line with every sample (seconds, slowest rank).
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SETTINGS = json.loads(sys.argv[1])


def slowest(comm, seconds: float) -> float:
    from mpi4py import MPI

    return comm.allreduce(seconds, op=MPI.MAX)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    from hvdllm.common.launch import threads_per_rank, world_comm

    comm = world_comm()  # the first use of MPI, as in `hvdllm train`
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from hvdllm.common.config import load_config
    from hvdllm.common.data import ShardedBatchSampler
    from hvdllm.common.topology import Topology
    from hvdllm.common.checkpoint_writer import CheckpointManager
    from hvdllm.torch.distributed import init_groups
    from hvdllm.torch.engine import build_engine

    s = SETTINGS
    rank, size = comm.Get_rank(), comm.Get_size()
    scratch = Path(s["dir"])
    mb = s["micro_batch"]
    cfg = load_config(REPO / "configs" / "demo.toml",
                      [*s["model"], f"parallel.dp={size}", f"train.micro_batch_size={mb}",
                       f"train.global_batch_size={mb * size}", "train.sample_tokens=0",
                       f"output.dir={scratch / 'hvdllm'}"])
    topology = Topology(size)
    groups = init_groups(topology, comm, cfg.parallel.timeout_sec)
    threads = threads_per_rank(comm)
    engine = build_engine(cfg, groups, threads)
    dist.init_process_group("gloo", rank=rank, world_size=size)  # MASTER_ADDR/PORT from launcher
    pg = dist.group.WORLD

    rng = np.random.default_rng(rank)
    x = rng.integers(0, cfg.model.vocab_size, (mb, cfg.model.seq_len), dtype=np.int64)
    micro = [(x, np.roll(x, -1, axis=1))]

    def step() -> float:
        comm.Barrier()
        start = time.perf_counter()
        engine.train_step(micro, cfg.train.lr)
        return slowest(comm, time.perf_counter() - start)

    for _ in range(s["warmup_steps"]):
        step()
    steps = [step() for _ in range(s["steps"])]

    manager = CheckpointManager(
        cfg.output.dir, groups.world.comm, cfg.output.keep_checkpoints, cfg.to_dict(),
        {"dp": topology.dp, "tp": topology.tp, "pp": topology.pp, "world": topology.world_size},
        cfg.train.framework, cfg.parallel.timeout_sec)
    sampler = ShardedBatchSampler(10_000, cfg.train.global_batch_size, mb, groups.dp.rank,
                                  topology.dp, cfg.train.seed)
    dcp_root = scratch / "dcp"
    dcp_root.mkdir(parents=True, exist_ok=True)
    save_no = 0
    info: dict = {}

    def hvdllm_save() -> dict:
        """Start one hvdllm save; returns the training thread's times and a waiter."""
        nonlocal save_no
        save_no += 1
        comm.Barrier()
        t0 = time.perf_counter()
        state = manager.new_state()  # the previous save has committed: reuses its buffers
        engine.capture_state(state)
        t1 = time.perf_counter()
        state.shared["step"] = save_no
        state.shared["data"] = sampler.state_dict()
        manager.save(save_no, state)
        t2 = time.perf_counter()
        info["hvdllm_rank_bytes"] = comm.allgather(state.nbytes())
        return {"stall": t2 - t0, "capture": t1 - t0, "save_call": t2 - t1, "t0": t0,
                "wait": manager.wait}

    def dcp_save() -> dict:
        nonlocal save_no
        save_no += 1
        path = dcp_root / f"save-{save_no}"
        comm.Barrier()
        t0 = time.perf_counter()
        state = {"model": engine.model.state_dict(),
                 "optim": engine.update.optimizer.state_dict()}
        t1 = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(path), process_group=pg)
        t2 = time.perf_counter()
        return {"stall": t2 - t0, "capture": t1 - t0, "save_call": t2 - t1, "t0": t0,
                "wait": future.result, "path": path}

    def finish(side: str, started: dict, sample: dict) -> None:
        """Wait for the save (untimed for the stall), record its samples, clean up."""
        started["wait"]()
        done = time.perf_counter() - started["t0"]
        comm.Barrier()
        for key in ("stall", "capture", "save_call"):
            sample[key] = slowest(comm, started[key])
        sample["commit"] = slowest(comm, done)  # start of the save to written and committed
        if rank == 0:
            if side == "dcp":
                info["dcp_dir_bytes"] = dir_bytes(started["path"])
                info["dcp_files"] = {f.name: f.stat().st_size
                                     for f in sorted(started["path"].iterdir())}
                shutil.rmtree(started["path"], ignore_errors=True)
            elif manager.last_path is not None:
                info["hvdllm_dir_bytes"] = dir_bytes(Path(manager.last_path))
                info["hvdllm_files"] = {f.name: f.stat().st_size
                                        for f in sorted(Path(manager.last_path).iterdir())}
        comm.Barrier()

    sides = {"hvdllm": hvdllm_save, "dcp": dcp_save}
    samples: dict[str, list[dict]] = {"hvdllm": [], "dcp": []}
    for rep in range(s["save_reps"] + 1):  # repetition 0 is warm-up
        for side in (("hvdllm", "dcp") if rep % 2 == 0 else ("dcp", "hvdllm")):
            sample: dict = {}
            finish(side, sides[side](), sample)
            if rep:
                samples[side].append(sample)

    # The floor under capture_state: the same tensors copied by plain numpy on
    # rank 0 (the rank that holds them all at dp = 2), into fresh buffers as
    # capture_state does, and into buffers kept from the previous copy.
    tensors = [p.detach() for p in engine.model.parameters()]
    tensors += [t for st in engine.update.optimizer.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0]
    fresh, reused = [], []
    if rank == 0:
        kept = [np.empty(tuple(t.shape), np.float32) for t in tensors]
        for rep in range(s["save_reps"] + 1):
            start = time.perf_counter()
            copies = [np.array(t.numpy(), copy=True, order="C") for t in tensors]
            mid = time.perf_counter()
            for buf, t in zip(kept, tensors):
                np.copyto(buf, t.numpy())
            end = time.perf_counter()
            copies.clear()  # freed before the next fresh copy, as a finished save frees its own
            if rep:
                fresh.append(mid - start)
                reused.append(end - mid)
    comm.Barrier()

    # A training step while each side's save is written in the background.
    inflight: dict[str, list[float]] = {"hvdllm": [], "dcp": []}
    for rep in range(s["inflight_reps"]):
        for side in (("hvdllm", "dcp") if rep % 2 == 0 else ("dcp", "hvdllm")):
            started = sides[side]()
            inflight[side].append(step())
            finish(side, started, {})
    after = [step() for _ in range(2)]  # the step time again, with nothing in flight

    manager.close()
    dist.destroy_process_group()
    if rank == 0:
        num_params = engine.num_params
        opt_bytes = sum(t.numel() * t.element_size()
                        for st in engine.update.optimizer.state.values()
                        for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
        print(json.dumps({
            "num_params": num_params, "threads": threads, "steps": steps, "steps_after": after,
            "param_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
            "optimizer_bytes": opt_bytes, "hvdllm": samples["hvdllm"], "dcp": samples["dcp"],
            "inflight": inflight, "copy_fresh": fresh, "copy_reused": reused, **info,
            "median_step": statistics.median(steps + after)}), flush=True)


if __name__ == "__main__":
    main()
