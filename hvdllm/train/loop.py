"""The framework-free training loop shared by the torch and TensorFlow paths."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..common import watchdog
from ..common.config import Config
from ..common.data import ByteTokenizer, ShardedBatchSampler, TokenWindows
from ..common.metrics import MetricsWriter, ProgressBar
from ..common.topology import ParallelGroups
from .checkpointing import Preempted, ResumePoint, RunCheckpoints
from .engine import Engine


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up to ``train.lr`` over ``train.warmup_steps``, then constant."""
    t = cfg.train
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    return t.lr


@dataclass
class TrainSummary:
    """What a run produced, returned to the CLI and to tests."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    elapsed_sec: float = 0.0
    sample_text: str = ""
    first_step: int = 1
    checkpoint: str | None = None


def run_training(cfg: Config, engine: Engine, windows: TokenWindows, groups: ParallelGroups,
                 writer: MetricsWriter, show_progress: bool,
                 resume: ResumePoint | None = None) -> TrainSummary:
    """Train up to ``cfg.train.steps`` optimizer steps, from ``resume`` when given.

    The logged loss is the mean over the whole global batch: each rank's
    loss averaged over the data-parallel group.  Checkpoints are saved as
    ``output.checkpoint_every`` and ``output.checkpoint`` ask; a stop signal
    ends the run after a save (:class:`hvdllm.train.checkpointing.Preempted`).
    """
    t = cfg.train
    dp_rank, _, _ = groups.coords
    sampler = ShardedBatchSampler(len(windows), t.global_batch_size, t.micro_batch_size,
                                  dp_rank, groups.topology.dp, t.seed)
    checkpoints = RunCheckpoints(cfg, groups, engine, sampler)
    try:
        done = checkpoints.restore(resume or ResumePoint())
        writer.open(keep_until=done if done else None)
        progress = ProgressBar(t.steps, enabled=show_progress, done=done)
        summary = TrainSummary(first_step=done + 1)
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        start = time.perf_counter()
        window_start, window_steps = start, 0
        dog = watchdog.current()
        checkpoints.start()
        for step in range(done + 1, t.steps + 1):
            dog.set_step(step)
            micro = [windows.batch(indices) for indices in sampler.next_step()]
            lr = learning_rate(step, cfg)
            local_loss = engine.train_step(micro, lr)
            window_steps += 1
            if step % t.log_every == 0 or step == t.steps:
                loss = float(groups.dp.allreduce(np.array([local_loss], np.float64), "mean")[0])
                now = time.perf_counter()
                tokens_per_sec = tokens_per_step * window_steps / max(now - window_start, 1e-9)
                record = {"step": step, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                          "elapsed_sec": now - start, "epoch": sampler.epoch}
                # Engine extras: comm_bytes (DP gradient bytes this rank sent in the
                # step), grad_norm with clipping, loss_scale and skipped with fp16.
                record.update(engine.step_metrics())
                writer.log(record)
                summary.losses.append(loss)
                progress.update(step, loss=loss, tok_s=int(tokens_per_sec))
                window_start, window_steps = now, 0
            checkpoints.after_step(step)
        dog.set_step(-1)  # what follows (the final checkpoint, sampling) is after training
        final = checkpoints.finish(t.steps)
    except BaseException as exc:
        # A stop signal's save has committed; after a failure, do not wait on peers.
        checkpoints.close(wait=isinstance(exc, Preempted))
        raise
    summary.checkpoint = str(final) if final else None
    summary.steps = t.steps
    summary.elapsed_sec = time.perf_counter() - start
    if t.sample_tokens:
        tok = ByteTokenizer()
        prompt = tok.encode("The ")
        out = engine.generate(prompt, t.sample_tokens, seed=t.seed)
        summary.sample_text = tok.decode(out)
    return summary
