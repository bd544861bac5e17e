"""The framework-free training loop shared by the torch and TensorFlow paths."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..common import timeline, watchdog
from ..common.config import Config, parse_straggler, slow_factor
from ..common.data import ShardedBatchSampler, TokenWindows, eval_micro_batches
from ..common.tokenizer import load_tokenizer
from ..common.metrics import MetricsWriter, ProgressBar
from ..common.topology import ParallelGroups
from .checkpointing import Preempted, ResumePoint, RunCheckpoints
from .engine import Engine
from .mfu import flops_per_token


def learning_rate(step: int, cfg: Config) -> float:
    """The learning rate of optimizer step ``step`` (1-based): a pure function of the step.

    Linear warm-up from 0 to ``train.lr`` over ``train.warmup_steps``;
    then ``train.lr_schedule``: "constant" stays at ``lr``, "cosine" and
    "linear" decay from ``lr`` (at the end of warm-up) to ``train.min_lr``
    (at ``train.steps``).
    """
    t = cfg.train
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = t.steps - t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / span) if span > 0 else 1.0
    if t.lr_schedule == "cosine":
        return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr + (t.min_lr - t.lr) * progress


class Evaluator:
    """The validation loss: the same windows, in the same order, in every layout.

    Each DP rank evaluates its slice of every validation batch (see
    :func:`hvdllm.common.data.eval_micro_batches`); the result is the mean
    over the batches and the DP group.  Collective over the whole world.
    """

    def __init__(self, cfg: Config, engine: Engine, windows: TokenWindows,
                 groups: ParallelGroups):
        t = cfg.train
        dp_rank, _, _ = groups.coords
        self.engine = engine
        self.groups = groups
        self.windows = windows
        self.batches = eval_micro_batches(len(windows), t.global_batch_size, t.micro_batch_size,
                                          dp_rank, groups.topology.dp, t.eval_batches)

    def __call__(self) -> float:
        total = 0.0
        for batch in self.batches:  # token arrays cut per evaluation: cheap, and not kept
            total += self.engine.eval_loss([self.windows.batch(indices) for indices in batch])
        local = np.array([total / len(self.batches)], np.float64)
        return float(self.groups.dp.allreduce(local, "mean")[0])


@dataclass
class TrainSummary:
    """What a run produced, returned to the CLI and to tests."""

    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    elapsed_sec: float = 0.0
    sample_text: str = ""
    first_step: int = 1
    checkpoint: str | None = None


def run_training(cfg: Config, engine: Engine, windows: TokenWindows, groups: ParallelGroups,
                 writer: MetricsWriter, show_progress: bool,
                 resume: ResumePoint | None = None, val_windows: TokenWindows | None = None,
                 peak_flops: float = 0.0) -> TrainSummary:
    """Train up to ``cfg.train.steps`` optimizer steps, from ``resume`` when given.

    The logged loss is the mean over the whole global batch: each rank's
    loss averaged over the data-parallel group.  Checkpoints are saved as
    ``output.checkpoint_every`` and ``output.checkpoint`` ask; a stop signal
    ends the run after a save (:class:`hvdllm.train.checkpointing.Preempted`).

    With ``train.eval_every`` the validation loss of ``val_windows`` is
    computed every that many steps and at the last step; it touches neither
    the data order nor any random stream, and its time is left out of
    ``tokens_per_sec``.  With ``peak_flops`` (one rank's FLOP/s) each
    logged record carries ``mfu``.
    """
    t = cfg.train
    evaluate = None
    if t.eval_every and val_windows is not None:
        evaluate = Evaluator(cfg, engine, val_windows, groups)
    world = groups.topology.world_size
    model_flops = flops_per_token(cfg.model)
    dp_rank, _, _ = groups.coords
    sampler = ShardedBatchSampler(len(windows), t.global_batch_size, t.micro_batch_size,
                                  dp_rank, groups.topology.dp, t.seed)
    checkpoints = RunCheckpoints(cfg, groups, engine, sampler)
    straggler = parse_straggler(cfg.parallel.straggler)
    try:
        done = checkpoints.restore(resume or ResumePoint())
        writer.open(keep_until=done if done else None)
        progress = ProgressBar(t.steps, enabled=show_progress, done=done)
        summary = TrainSummary(first_step=done + 1)
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        start = time.perf_counter()
        window_start, window_steps, window_eval = start, 0, 0.0
        dog = watchdog.current()
        prof = timeline.current()
        checkpoints.start()
        for step in range(done + 1, t.steps + 1):
            dog.set_step(step)
            prof.at_step(step)
            micro = [windows.batch(indices) for indices in sampler.next_step()]
            lr = learning_rate(step, cfg)
            if straggler is not None:  # the replica sleeps after its forward and backward
                engine.slow_factor = slow_factor(straggler, dp_rank, groups.topology.dp, t.seed,
                                                 step)
            local_loss = engine.train_step(micro, lr)
            window_steps += 1
            val_loss = None
            if evaluate is not None and (step % t.eval_every == 0 or step == t.steps):
                eval_start = time.perf_counter()
                val_loss = evaluate()
                window_eval += time.perf_counter() - eval_start
                summary.val_losses.append((step, val_loss))
            if step % t.log_every == 0 or step == t.steps:
                loss = float(groups.dp.allreduce(np.array([local_loss], np.float64), "mean")[0])
                now = time.perf_counter()
                train_sec = max(now - window_start - window_eval, 1e-9)
                tokens_per_sec = tokens_per_step * window_steps / train_sec
                record = {"step": step, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                          "tokens_per_sec_per_rank": tokens_per_sec / world,
                          "elapsed_sec": now - start, "epoch": sampler.epoch}
                if peak_flops > 0:
                    record["mfu"] = tokens_per_sec / world * model_flops / peak_flops
                if val_loss is not None:
                    record["val_loss"] = val_loss
                # Engine extras: comm_bytes (DP gradient bytes this rank sent in the
                # step), grad_norm with clipping, loss_scale and skipped with fp16.
                record.update(engine.step_metrics())
                writer.log(record)
                summary.losses.append(loss)
                fields = {"loss": loss, "tok_s": int(tokens_per_sec)}
                if val_loss is not None:
                    fields["val_loss"] = val_loss
                progress.update(step, **fields)
                window_start, window_steps, window_eval = now, 0, 0.0
            elif val_loss is not None:
                writer.log({"step": step, "val_loss": val_loss})
                progress.update(step, val_loss=val_loss)
            with prof.span("checkpoint staging"):
                checkpoints.after_step(step)
        prof.at_step(0)
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
        tok = load_tokenizer(cfg.data.tokenizer)
        prompt = tok.encode("The ")
        out = engine.generate(prompt, t.sample_tokens, seed=t.seed)
        summary.sample_text = tok.decode(out)
    return summary
