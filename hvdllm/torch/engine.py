"""The PyTorch training engine: model, tensor and pipeline parallelism, optimizer, DP sync."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..common import timeline, watchdog
from ..common.config import Config, straggle
from ..common.topology import ParallelGroups
from ..common.family import family_spec
from ..common.train_checkpoint import CheckpointReader, RankState
from .data_parallel import broadcast_module
from .distributed import import_horovod
from .models import CausalLM
from .pipeline import PipelineExecutor, build_pipeline, plan_split
from .state import TorchState
from .tensor_parallel import TensorParallelGroup, parallelize, replicated_parameters
from .update import GradientUpdate


def build_model(cfg: Config) -> CausalLM:
    """The full (unsharded) reference model for ``cfg.model``.

    Initialised from ``train.seed``, or loaded from ``model.init_from`` (a
    Hugging Face directory as "hf:DIR", or an hvdllm checkpoint).  With
    ``parallel.recompute = "full"`` and no pipeline, every block is
    recomputed in backward (the pipeline executor recomputes its chunks).
    """
    from .models import model_from_config

    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = model_from_config(m)
    model.recompute = cfg.parallel.recompute == "full" and cfg.parallel.pp == 1
    if m.init_from:
        from .hf import init_from

        init_from(model, m.init_from, m)  # the full weights; parallelize() slices them later
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (decoupled decay) or SGD with momentum (L2 decay).

    Weight decay applies to matrices only (not biases, norms or other 1-D
    parameters).  AdamW uses torch's fused kernel, one pass over all
    parameters: 2.9 ms a step against 17 ms for the default per-tensor loop
    on the 3.3M-parameter benchmark model, one thread (docs/benchmarks.md).
    """
    t = cfg.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    fused = all(p.dtype.is_floating_point for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=fused or None)


class TorchEngine:
    """One rank's training step: TP-sharded model, DP gradient sync, AdamW.

    Built by :func:`build_engine`.  Gradient accumulation: each
    micro-batch's loss is scaled by 1/accum_steps and back-propagated; only
    the last micro-batch's backward starts the (overlapped) DP allreduce,
    so accumulation costs no DP traffic.  Under sequence parallelism the
    replicated parameters (norms, biases, positions) saw only part of the
    sequence on each rank, so their gradients are summed over TP.

    With pp > 1 a step walks the stage's schedule over the same
    micro-batches; the backwards of the last micro-batch run inside the DP
    sync block, and after the DP average and the sequence-parallel reduce,
    GPT's tied embedding gradient is summed across the first and last
    stages before the optimizer step.

    Args:
        cfg: the run's config.
        groups: this rank's groups.
        model: this rank's model: sharded by :func:`parallelize` and, with
            a pipeline, cut down to the stage's chunks.
        tp: the tensor-parallel group.
        pipeline: the stage's executor (None without pipelining).
        update: gradient averaging, clipping and the optimizer step.
        num_params: parameters of the full model.
        log_lines: start-up log lines (the pipeline split).
    """

    def __init__(self, cfg: Config, groups: ParallelGroups, model: CausalLM,
                 tp: TensorParallelGroup, pipeline: PipelineExecutor | None,
                 update: GradientUpdate, num_params: int, log_lines: list[str]):
        self.cfg = cfg
        self.groups = groups
        self.model = model
        self.tp = tp
        self.pipeline = pipeline
        self.update = update
        self.num_params = num_params
        self._log_lines = log_lines
        self._tp_replicated = replicated_parameters(model) if tp.sequence_parallel else []
        self._metrics: dict = {}
        self.slow_factor = 1.0  # parallel.straggler: this replica's slow-down
        self.state = TorchState(model, update, groups, cfg.train.optimizer,
                                family_spec(cfg.model))

    def describe(self) -> list[str]:
        return list(self._log_lines)

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   lr: float) -> float:
        loss = self.compute_gradients(micro_batches)
        with timeline.current().span("optimizer"):
            self._metrics = self.update.apply(lr).as_metrics()
        return loss

    def compute_gradients(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """The step up to the optimizer: gradients averaged over the micro-batches and
        the data-parallel group, in each parameter's ``.grad``; returns the loss."""
        began = time.perf_counter()
        self.model.train()
        self.update.zero_grad()
        if self.pipeline is not None:
            loss = self.pipeline.train_step(micro_batches, self.update.last_backward,
                                            autocast=self.update.autocast,
                                            scale_loss=self.update.scale_loss)
        else:
            n = len(micro_batches)
            total = 0.0
            wd = watchdog.current()
            prof = timeline.current()
            for i, (x, y) in enumerate(micro_batches):
                wd.set_micro(i)
                with prof.span("forward", mb=i), self.update.autocast():
                    loss = self.model.loss(torch.from_numpy(x), torch.from_numpy(y))
                with prof.span("backward", mb=i):
                    self.update.backward(loss / n, last=i == n - 1)
                total += loss.item()
            loss = total / n
        straggle(self.slow_factor, began)  # parallel.straggler, before the gradients leave
        prof = timeline.current()
        with prof.span("grad sync"):
            self.update.reduce_gradients()
            self.tp.all_reduce_grads(self._tp_replicated)
            if self.pipeline is not None:
                self.pipeline.reduce_tied_grads()
        return loss

    # -- parameter-server mode (hvdllm.train.ps_runner) ---------------------
    def ps_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's trained parameters, in the order of its flat vector."""
        return [p for _, p in self.update.named_params]

    def ps_decay_mask(self) -> np.ndarray:
        """Per float of the flat vector: weight decay applies (matrices only)."""
        return np.concatenate([np.full(p.numel(), p.dim() >= 2, np.uint8)
                               for p in self.ps_parameters()])

    def ps_get(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.ps_parameters()]).numpy()

    def ps_set(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.ps_parameters():
                n = p.numel()
                p.copy_(torch.from_numpy(flat[offset:offset + n]).view_as(p))
                offset += n

    def ps_set_optimizer(self, steps: int, slots: dict[str, np.ndarray]) -> None:
        """Load the servers' optimizer state (flat, in :meth:`ps_get`'s order):
        ``m`` is AdamW's first moment or SGD's momentum, ``v`` AdamW's second
        moment; ``steps`` updates were applied.  Then :meth:`capture_state`
        saves a training checkpoint that a synchronous run resumes from."""
        from .state import _SLOTS

        name = self.cfg.train.optimizer
        keys = [key for _, key in _SLOTS[name]]
        flats = [slots["m"], slots["v"]][:len(keys)]
        opt = self.update.optimizer
        offset = 0
        for p in self.ps_parameters():
            n = p.numel()
            st: dict[str, torch.Tensor] = {}
            if name == "adamw":
                st["step"] = torch.tensor(float(steps), dtype=torch.float32)
            for key, flat in zip(keys, flats):
                st[key] = torch.from_numpy(flat[offset:offset + n].copy()).view_as(p)
            opt.state[p] = st
            offset += n

    def ps_gradients(self) -> np.ndarray:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.ps_parameters()]).numpy()

    @torch.no_grad()
    def eval_loss(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Forward-only mean loss of ``micro_batches``; dropout off, no gradients or RNG draws."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.pipeline is not None:
                return self.pipeline.eval_loss(micro_batches, autocast=self.update.autocast)
            total = 0.0
            for x, y in micro_batches:
                with self.update.autocast():
                    loss = self.model.loss(torch.from_numpy(x), torch.from_numpy(y))
                total += loss.item()
            return total / len(micro_batches)
        finally:
            self.model.train(was_training)

    def step_metrics(self) -> dict:
        return self._metrics

    def capture_state(self, state: RankState) -> None:
        self.state.capture(state)

    def restore_state(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        return self.state.restore(reader, same_layout)

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        self.model.eval()
        gen = torch.Generator().manual_seed(seed)
        idx = torch.from_numpy(np.asarray(prompt, np.int64))[None, :]
        model = self.model if self.pipeline is None else self.pipeline.language_model()
        with self.tp.sequence_parallel_off():  # generation lengths need not divide by tp
            return model.generate(idx, max_new_tokens, generator=gen)[0].numpy()


def build_engine(cfg: Config, groups: ParallelGroups, threads: int) -> TorchEngine:
    """The engine for ``hvdllm train``, built in the order of the design.

    config -> model -> tensor parallelism (with sequence parallelism) ->
    pipeline cut (with recompute) -> data-parallel start -> optimizer.
    Every rank builds the full model from ``train.seed`` (or
    ``model.init_from``) and keeps its slices of it, so any layout starts
    from the weights of one process.

    Args:
        cfg: the run's config.
        groups: this rank's groups.
        threads: this rank's share of the node's cores.
    """
    torch.set_num_threads(threads)
    hvd = import_horovod()
    model = build_model(cfg)  # the full reference model; recompute set for pp = 1
    num_params = sum(p.numel() for p in model.parameters())
    # The pipeline split is chosen on the full model ("balanced" measures it).
    split = plan_split(model, cfg, groups) if cfg.parallel.pp > 1 else None
    tp = TensorParallelGroup(groups.tp, cfg.parallel.sequence_parallel, hvd=hvd)
    parallelize(model, tp)
    pipeline, log_lines = None, []
    if split is not None:
        pipeline = build_pipeline(model, split, cfg, groups, tp)  # recompute per chunk
        log_lines.append(split.describe(cfg.parallel.pp))
    broadcast_module(model, groups.dp, hvd)
    update = GradientUpdate(model, build_optimizer(model, cfg), cfg, groups, hvd)
    return TorchEngine(cfg, groups, model, tp, pipeline, update, num_params, log_lines)
