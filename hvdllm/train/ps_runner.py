"""``hvdllm train`` with ``parallel.mode = "ps"``: servers and workers.

The world is ``parallel.ps_servers`` server ranks (the last ones) plus
dp x tp x pp worker ranks.  Servers run :class:`~hvdllm.common.param_server.ParameterServer`
(numpy only); the first server writes ``metrics.jsonl`` (one record per
applied update: the mean loss of the replicas' gradients, the staleness
of each, the wall time).  Each worker replica is a tp x pp engine of its
own (Horovod is started on the replica's ranks only, so there is no
data-parallel sync); it computes the gradient of each step on its slice of
the global batch, pushes it and pulls parameters within the staleness bound.

What a worker replica may hold: tp and pp as in sync mode.  Each (tp, pp)
rank has its own parameter space on the servers; ranks that keep
identical copies of a tensor (norms under plain tensor parallelism, GPT's
tied embedding on the first and last stages) push identical gradients, so
the copies stay equal.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from ..common.config import Config, check_ps_world, parse_straggler, slow_factor, to_toml
from ..common.data import ShardedBatchSampler, load_datasets
from ..common.errors import HvdllmError
from ..common.failure import install_failure_handler
from ..common.launch import check_launcher, threads_per_rank, world_comm
from ..common.metrics import MetricsWriter, _summary_writer_class
from ..common.param_server import (PS_CHECKPOINTS, OptimizerSpec, ParameterServer,
                                   ServerClient, ShardWriter, UpdateRecord, load_shards,
                                   newest_complete)
from ..common.topology import Topology
from ..common.checkpoint_writer import check_writable
from .checkpointing import Preempted, _StopRequest
from .loop import TrainSummary, learning_rate


def replica_config(cfg: Config) -> Config:
    """The config one worker replica runs: dp 1, its share of the global batch."""
    p, t = cfg.parallel, cfg.train
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(p, dp=1, mode="sync", straggler=""),
        train=dataclasses.replace(t, global_batch_size=t.global_batch_size // p.dp))


def train_ps(cfg: Config) -> TrainSummary:
    """Run a parameter-server job; every rank returns the run's summary."""
    from .runner import _agree, _load_adapter

    comm = world_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    p, t = cfg.parallel, cfg.train
    workers = p.dp * p.tp * p.pp
    is_server = rank >= workers
    error: HvdllmError | None = None
    windows = engine_mod = dist_mod = None
    try:
        check_launcher(comm)
        check_ps_world(cfg, size)
        check_writable(cfg.output.dir)
        if is_server:
            if rank == workers:
                _summary_writer_class()
        else:
            windows, _ = load_datasets(cfg.data.path, cfg.data.val_fraction, cfg.data.val_path,
                                       cfg.model.seq_len, cfg.data.tokenizer)
            engine_mod, dist_mod = _load_adapter(t.framework)
    except HvdllmError as exc:
        error = exc
    install_failure_handler(comm)  # before the agreement, as in sync mode
    _agree(comm, error, p.timeout_sec)
    servers = list(range(workers, size))
    # The first server picks the step to resume from: the newest checkpoint
    # that every server wrote (its shards hold all the state there is).
    start = 0
    if rank == workers and t.resume == "auto":
        start = newest_complete(cfg.output.dir, len(servers), t.steps)
    start = comm.bcast(start, root=workers)
    if start >= t.steps and start > 0:
        if rank == 0:
            print(f"hvdllm: this run already finished: its parameter-server checkpoint is at "
                  f"step {start} of train.steps = {t.steps}; nothing to do", flush=True)
        return TrainSummary(steps=start, first_step=start + 1)
    sub = comm.Split(1 if is_server else 0, rank)
    topo = Topology(p.dp, p.tp, p.pp)
    if rank == 0:
        print(f"hvdllm: parameter-server mode: {len(servers)} server(s) (ranks "
              f"{servers[0]}-{servers[-1]}) and {p.dp} worker replica(s) of tp {p.tp} x pp "
              f"{p.pp}; staleness bound {p.staleness}"
              + (f"; resuming after step {start}" if start else ""), flush=True)
    stop = _StopRequest()  # SIGTERM / SIGUSR1: stop after a clock, save, exit 75
    stop.install()
    try:
        if is_server:
            return _serve(cfg, comm, servers, topo, start, stop)
        replica, tp_rank, pp_rank = topo.coords(rank)
        space = tp_rank + p.tp * pp_rank
        replica_comm = sub.Split(replica, space)
        rcfg = replica_config(cfg)
        groups = dist_mod.init_groups(Topology(1, p.tp, p.pp), replica_comm, p.timeout_sec,
                                      horovod_dp=False)
        engine = engine_mod.build_engine(rcfg, groups, threads=threads_per_rank(comm))
        return _work(cfg, comm, engine, windows, servers, replica, space, start, stop)
    finally:
        stop.uninstall()


def _preempted(stop: _StopRequest, step: int, checkpoint: str | None) -> Preempted:
    what = stop.signal_name or "a signal on another rank"
    where = f"; checkpoint in {checkpoint}" if checkpoint else ""
    exc = Preempted(f"stopped by {what} after step {step}{where}; the servers' state is in "
                    f"{PS_CHECKPOINTS}/; rerun the same command to continue")
    exc.agreed = exc.all_ranks = True  # type: ignore[attr-defined]
    return exc


def _serve(cfg: Config, comm: Any, servers: list[int], topo: Topology,
           start: int, stop: _StopRequest) -> TrainSummary:
    p, t = cfg.parallel, cfg.train
    rank = comm.Get_rank()
    index = servers.index(rank)
    writer = MetricsWriter(cfg.output.dir, enabled=index == 0)
    writer.write_config(to_toml(cfg))
    writer.open(keep_until=start if start else None)
    tokens = t.global_batch_size * cfg.model.seq_len
    summary = TrainSummary(first_step=start + 1)
    states = load_shards(cfg.output.dir, start, index) if start else None
    last = [0.0]

    def log(rec: UpdateRecord) -> None:
        elapsed = rec.time
        record = {"step": rec.clock + 1, "loss": rec.loss, "lr": rec.lr,
                  "tokens_per_sec": tokens / max(elapsed - last[0], 1e-9),
                  "elapsed_sec": elapsed, "staleness": rec.staleness,
                  "staleness_max": max(rec.staleness)}
        last[0] = elapsed
        writer.log(record)
        summary.losses.append(rec.loss)

    def coords(r: int) -> tuple[int, int]:
        d, tp_rank, pp_rank = topo.coords(r)
        return d, tp_rank + p.tp * pp_rank

    shards = ShardWriter(cfg.output.dir, index, len(servers), cfg.output.keep_checkpoints)
    server = ParameterServer(comm, range(topo.world_size), coords, p.dp, p.tp * p.pp, index,
                             len(servers), t.steps, lambda step: learning_rate(step, cfg),
                             OptimizerSpec.from_config(t), p.timeout_sec,
                             on_update=log if index == 0 else None, first_clock=start,
                             save=shards.submit,
                             save_every=cfg.output.checkpoint_every,
                             save_last=cfg.output.checkpoint,
                             extrapolate=p.ps_compensation == "extrapolate",
                             stop_requested=lambda: stop.signal_name is not None,
                             server_ranks=servers)
    began = time.perf_counter()
    try:
        server.receive_spaces(states)
        server.serve()
        shards.close()
    finally:
        writer.close()
    summary.steps = t.steps
    summary.elapsed_sec = time.perf_counter() - began
    if server.stop_clock is not None and server.stop_clock + 1 < t.steps:
        raise _preempted(stop, server.stop_clock + 1, None)
    if index == 0 and server.updates:
        worst = max(max(u.staleness) for u in server.updates)
        print(f"hvdllm: done steps {start + 1}-{t.steps} in {summary.elapsed_sec:.1f}s on "
              f"{len(servers)} server(s) and {p.dp} worker replica(s); loss "
              f"{server.updates[0].loss:.4f} -> {server.updates[-1].loss:.4f}; largest "
              f"staleness {worst} (bound {p.staleness}); metrics in "
              f"{cfg.output.dir}/metrics.jsonl", flush=True)
    return summary


def _final_checkpoint(cfg: Config, engine: Any, client: ServerClient, sampler: Any,
                      params: np.ndarray, step: int) -> str | None:
    """Replica 0's ranks write the servers' final state as a training checkpoint
    (``output.dir/checkpoints/step-N``, the format of synchronous runs): the
    parameters, the optimizer state and the data position.  ``hvdllm
    generate`` and ``export`` read it, and a synchronous run resumes from it
    (``train.resume = PATH``; the layout is resharded from dp 1).  ``step``:
    the run's last step (``train.steps``, or where it stopped early)."""
    from ..common.checkpoint_writer import CheckpointManager

    t = cfg.train
    _, steps, slots = client.pull_state(step, params)
    sampler.state.consumed = step * t.global_batch_size
    engine.ps_set(params)
    engine.ps_set_optimizer(steps, slots)
    world = engine.groups.world
    topo = engine.groups.topology
    manager = CheckpointManager(cfg.output.dir, world.comm, cfg.output.keep_checkpoints,
                                cfg.to_dict(), {"dp": topo.dp, "tp": topo.tp, "pp": topo.pp,
                                                "world": topo.world_size},
                                t.framework, cfg.parallel.timeout_sec)
    try:
        state = manager.new_state()
        engine.capture_state(state)
        state.shared["step"] = step
        state.shared["data"] = sampler.state_dict()
        path = manager.save(step, state, blocking=True)
    finally:
        manager.close()
    if world.rank == 0 and path is not None:
        print(f"hvdllm: wrote the servers' final state to {path}", flush=True)
    return str(path) if path is not None else None


def _work(cfg: Config, comm: Any, engine: Any, windows: Any, servers: list[int],
          replica: int, space: int, start: int, stop: _StopRequest) -> TrainSummary:
    p, t = cfg.parallel, cfg.train
    sampler = ShardedBatchSampler(len(windows), t.global_batch_size, t.micro_batch_size,
                                  replica, p.dp, t.seed)
    sampler.state.consumed = start * t.global_batch_size  # the data order is the step's
    straggler = parse_straggler(p.straggler)
    params = engine.ps_get()
    client = ServerClient(comm, servers, space, replica, params.size, p.timeout_sec)
    client.hello(params, engine.ps_decay_mask())
    client.pull(start, params)
    engine.ps_set(params)
    summary = TrainSummary(first_step=start + 1)
    began_run = time.perf_counter()
    for clock in range(start, t.steps):
        if stop.signal_name is not None:
            client.request_stop()
        if client.stopping_before(clock):
            break
        micro = [windows.batch(indices) for indices in sampler.next_step()]
        engine.slow_factor = slow_factor(straggler, replica, p.dp, t.seed, clock + 1)
        loss = engine.compute_gradients(micro)  # a straggler sleeps in there
        grads = engine.ps_gradients()
        client.push(clock, grads, loss)
        summary.losses.append(loss)
        if clock + 1 < t.steps:
            client.pull(clock + 1 - p.staleness, params, clock=clock + 1)
            engine.ps_set(params)
    summary.elapsed_sec = time.perf_counter() - began_run
    end = t.steps if client.stop_clock is None else min(client.stop_clock + 1, t.steps)
    if (cfg.output.checkpoint or end < t.steps) and replica == 0:
        summary.checkpoint = _final_checkpoint(cfg, engine, client, sampler, params, end)
    client.bye()
    if end < t.steps:
        raise _preempted(stop, end, summary.checkpoint)
    summary.steps = t.steps
    if os.environ.get("HVDLLM_VERBOSE"):
        print(f"hvdllm: worker rank {comm.Get_rank()} (replica {replica}) done", flush=True)
    return summary
