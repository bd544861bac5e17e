"""``hvdllm train``: config -> topology -> groups -> engine -> loop.

Start-up runs in two phases:

1. **Set-up** (no Horovod yet): topology against the world size, data,
   framework import.  Every rank runs it, then the ranks agree on whether it
   failed anywhere, so a bad config or a missing file gives one clean error
   on every launch method, never a hang.
2. **Training**: the hang watchdog starts (:mod:`hvdllm.common.watchdog`:
   any wait on other ranks longer than ``parallel.timeout_sec`` ends the
   job with a report), Horovod and the groups are initialised, and an
   uncaught exception on any rank aborts the whole job (see
   :mod:`hvdllm.common.failure`).
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from typing import Any

import numpy as np

from ..common import memory_probe, timeline
from ..common.comm import PendingOp
from ..common.config import Config, to_toml
from ..common.data import eval_micro_batches, load_datasets
from ..common.errors import HvdllmError
from ..common.failure import install_failure_handler
from ..common.launch import (check_launcher, cores_allowed, horovod_carries_gradients,
                             local_size, threads_per_rank, world_comm)
from ..common.metrics import MetricsWriter, _summary_writer_class
from ..common.topology import Topology, describe
from ..common.watchdog import Watchdog
from ..common.checkpoint_writer import check_writable
from .checkpointing import Preempted, choose_resume
from .loop import TrainSummary, run_training
from .mfu import compute_device_name, flops_per_token, resolve_peak

ADAPTERS = {"torch": "hvdllm.torch", "tensorflow": "hvdllm.tensorflow"}


class PeerSetupError(HvdllmError):
    """Another rank failed during set-up; that rank reports the reason."""


def _agree(comm: Any, error: HvdllmError | None, timeout_sec: float) -> None:
    """Raise on every rank if set-up failed on any rank.

    The raised error carries ``all_ranks``: True when every rank failed (so
    rank 0 alone needs to print the shared message).
    """
    size = comm.Get_size()
    failed = 1 if error else 0
    if size > 1:
        send = np.array([failed], np.int64)
        recv = np.empty_like(send)
        PendingOp([comm.Iallreduce(send, recv)], f"set-up agreement after {timeout_sec:g}s",
                  time.monotonic() + timeout_sec).wait()
        failed = int(recv[0])
    if not failed:
        return
    if error is None:
        error = PeerSetupError(f"{failed} other rank(s) failed during set-up")
    error.all_ranks = failed == size  # type: ignore[attr-defined]
    error.agreed = True  # type: ignore[attr-defined]
    raise error


def _load_adapter(framework: str) -> Any:
    """Import ``hvdllm.<framework>.engine`` and check Horovod is importable for it."""
    engine_mod = importlib.import_module(ADAPTERS[framework] + ".engine")
    dist_mod = importlib.import_module(ADAPTERS[framework] + ".distributed")
    dist_mod.import_horovod()
    return engine_mod, dist_mod


def train(cfg: Config) -> TrainSummary:
    """Run ``hvdllm train`` for an already validated config."""
    if cfg.parallel.mode == "ps":
        from .ps_runner import train_ps

        return train_ps(cfg)
    comm = world_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    error: HvdllmError | None = None
    try:
        check_launcher(comm)
        topology = Topology(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp)
        topology.check_world_size(size)
        d, t = cfg.data, cfg.train
        windows, val_windows = load_datasets(d.path, d.val_fraction, d.val_path,
                                             cfg.model.seq_len, d.tokenizer)
        if t.eval_every and val_windows is not None:  # at least one validation batch fits
            eval_micro_batches(len(val_windows), t.global_batch_size, t.micro_batch_size, 0,
                               topology.dp, t.eval_batches)
        check_writable(cfg.output.dir)
        if rank == 0:  # the metrics writer's TensorBoard library, checked while ranks agree
            _summary_writer_class()
        engine_mod, dist_mod = _load_adapter(cfg.train.framework)
    except HvdllmError as exc:
        error = exc
    # before the agreement: a rank whose agreement times out ends the job
    # (its pending collective would hold it in MPI_Finalize otherwise)
    install_failure_handler(comm)
    _agree(comm, error, cfg.parallel.timeout_sec)
    dog = None
    if cfg.parallel.watchdog:
        dog = Watchdog(comm, cfg.parallel.timeout_sec, output_dir=cfg.output.dir,
                       history=cfg.parallel.flight_record,
                       neighbours=topology.neighbours(rank)).start()
    threads = threads_per_rank(comm)
    share = max(1, (os.cpu_count() or 1) // local_size(comm))
    if rank == 0 and threads < share:
        print(f"hvdllm: warning: rank 0 is bound to {cores_allowed()} core(s) but its share of "
              f"this host is {share}; it uses {threads} thread(s). Give each rank its cores "
              f"(mpirun --map-by slot:PE={share}, or --bind-to none)", flush=True)
    timeline.enable_horovod_timeline(cfg)  # read when Horovod starts
    groups = dist_mod.init_groups(topology, comm, cfg.parallel.timeout_sec,
                                  horovod_dp=horovod_carries_gradients(cfg.train,
                                                                       cfg.train.framework))
    if dog is not None:
        dog.restart()
    resume = choose_resume(cfg, groups)
    if resume.step >= cfg.train.steps:
        if rank == 0:
            print(f"hvdllm: this run already finished: {resume.path} is at step {resume.step} "
                  f"of train.steps = {cfg.train.steps}; nothing to do", flush=True)
        if dog is not None:
            dog.stop()
        return TrainSummary(steps=resume.step, first_step=resume.step + 1,
                            checkpoint=str(resume.path))
    writer = MetricsWriter(cfg.output.dir, enabled=rank == 0)
    writer.write_config(to_toml(cfg))
    probe = memory_probe.start(cfg.train.framework)
    engine = engine_mod.build_engine(cfg, groups, threads=threads)
    # Every rank times its matmul at once, so the measured peak sees the host shared.
    peak, peak_source = resolve_peak(cfg.train.peak_flops,
                                     compute_device_name(cfg.train.framework),
                                     cfg.train.framework)
    if rank == 0:
        val_text = ""
        if val_windows is not None:
            val_text = f"; validation {len(val_windows.tokens):,} tokens"
        print(f"hvdllm: {cfg.train.framework} {cfg.model.family} with {engine.num_params:,} "
              f"parameters; world {size} = dp {topology.dp} x tp {topology.tp} x pp "
              f"{topology.pp}; {cfg.grad_accum_steps} accumulation step(s) of "
              f"{cfg.train.micro_batch_size} sequences; corpus {len(windows.tokens):,} "
              f"tokens{val_text}", flush=True)
        print(f"hvdllm: mfu against a peak of {peak / 1e12:.3g} TFLOP/s per rank "
              f"({peak_source}); {flops_per_token(cfg.model) / 1e6:.3g} MFLOP per token",
              flush=True)
        for line in engine.describe():
            print(f"hvdllm: {line}", flush=True)
    if os.environ.get("HVDLLM_VERBOSE"):
        print(f"hvdllm: {describe(topology, rank)} on host {socket.gethostname()} "
              f"({local_size(comm)} rank(s) on this host, {threads} thread(s) each; "
              f"Horovod over {os.environ.get('HOROVOD_CONTROLLER', 'mpi')})", flush=True)
    try:
        with timeline.profiling(cfg, comm, groups.coords):
            summary = run_training(cfg, engine, windows, groups, writer,
                                   show_progress=rank == 0, resume=resume,
                                   val_windows=val_windows, peak_flops=peak)
    except Preempted as exc:
        exc.agreed = exc.all_ranks = True  # type: ignore[attr-defined]
        if dog is not None:
            dog.stop()
        raise
    finally:
        writer.close()
    if dog is not None:
        dog.stop()
    if probe is not None:
        probe.finish(rank, os.environ[memory_probe.ENV])
    if rank == 0:
        losses = summary.losses
        if summary.checkpoint:
            print(f"hvdllm: checkpoint in {summary.checkpoint} (hvdllm convert --to-hf "
                  f"{summary.checkpoint} --out DIR)", flush=True)
        loss_text = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
        if summary.val_losses:
            loss_text += f"; val_loss {summary.val_losses[-1][1]:.4f}"
        print(f"hvdllm: done steps {summary.first_step}-{summary.steps} in "
              f"{summary.elapsed_sec:.1f}s{loss_text}; metrics in {cfg.output.dir}/metrics.jsonl",
              flush=True)
        if summary.sample_text:
            print("hvdllm: sample:\n" + summary.sample_text, flush=True)
    sys.stdout.flush()
    return summary
