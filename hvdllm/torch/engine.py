"""The PyTorch training engine: model, tensor and pipeline parallelism, optimizer, DP sync."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..common import watchdog
from ..common.config import Config
from ..common.topology import ParallelGroups
from .data_parallel import GradientSync, broadcast_module
from .distributed import import_horovod
from .models import GPT, CausalLM, GPTConfig, Llama, LlamaConfig
from .pipeline import build_pipeline, gather_pipeline_state, plan_split
from .tensor_parallel import (TensorParallelGroup, full_state_dict, parallelize,
                              replicated_parameters)
from .update import GradientUpdate


def build_model(cfg: Config) -> CausalLM:
    """The full (unsharded) reference model for ``cfg.model``.

    Initialised from ``train.seed``, or loaded from ``model.init_from`` (a
    Hugging Face directory as "hf:DIR", or an hvdllm checkpoint).
    """
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    common = dict(vocab_size=m.vocab_size, seq_len=m.seq_len, n_layer=m.n_layer,
                  n_head=m.n_head, d_model=m.d_model, d_ff=m.ff_width, dropout=m.dropout,
                  init_std=m.init_std, norm_eps=m.norm_eps)
    if m.family == "llama":
        model: CausalLM = Llama(LlamaConfig(n_kv_head=m.kv_heads, rope_theta=m.rope_theta,
                                            **common))
    else:
        model = GPT(GPTConfig(**common))
    if m.init_from:
        from .hf import init_from

        init_from(model, m.init_from, m)  # the full weights; parallelize() slices them later
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (decoupled decay) or SGD with momentum (L2 decay).

    Weight decay applies to matrices only (not biases, norms or other 1-D
    parameters).
    """
    t = cfg.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


class TorchEngine:
    """One rank's training step: TP-sharded model, DP gradient sync, AdamW.

    Every rank builds the full model from ``train.seed``; with tp > 1 each
    rank then keeps its slices of it (:func:`parallelize`), so any tp starts
    from the weights of tp=1.  Gradient accumulation: each micro-batch's
    loss is scaled by 1/accum_steps and back-propagated; only the last
    micro-batch's backward starts the (overlapped) DP allreduce, so
    accumulation costs no DP traffic.  Under sequence parallelism the
    replicated parameters (norms, biases, positions) saw only part of the
    sequence on each rank, so their gradients are summed over TP.

    With pp > 1 the split is chosen on the full model (``parallel.partition``),
    tensor parallelism is applied, and then the rank keeps only its stage's
    chunks (:mod:`hvdllm.torch.pipeline`).  A step walks the stage's
    schedule over the same micro-batches; the backwards of the last
    micro-batch run inside the DP sync block, and after the DP average and
    the sequence-parallel reduce, GPT's tied embedding gradient is summed
    across the first and last stages before the optimizer step.
    """

    def __init__(self, cfg: Config, groups: ParallelGroups):
        self.cfg = cfg
        self.groups = groups
        hvd = import_horovod()
        self.model = build_model(cfg)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self._param_names = [name for name, _ in self.model.named_parameters()]
        split = plan_split(self.model, cfg, groups) if cfg.parallel.pp > 1 else None
        self.tp = TensorParallelGroup(groups.tp, cfg.parallel.sequence_parallel, hvd=hvd)
        parallelize(self.model, self.tp)
        self.pipeline = None
        self.pipeline_summary = None  # one line for the log: which layers each stage holds
        if split is not None:
            self.pipeline = build_pipeline(self.model, split, cfg, groups, self.tp)
            self.pipeline_summary = split.describe(cfg.parallel.pp)
        self._tp_replicated = (replicated_parameters(self.model)
                               if self.tp.sequence_parallel else [])
        broadcast_module(self.model, groups.dp, hvd)
        self.update = GradientUpdate(self.model, build_optimizer(self.model, cfg), cfg, groups,
                                     hvd)
        self.last_step_info: dict = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.update.optimizer

    @property
    def sync(self) -> GradientSync | None:
        """The overlapped DP allreduce (None under compression or ZeRO-1)."""
        return self.update.sync

    @sync.setter
    def sync(self, value: GradientSync) -> None:
        self.update.sync = value

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   lr: float) -> float:
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
            for i, (x, y) in enumerate(micro_batches):
                wd.set_micro(i)
                with self.update.autocast():
                    loss = self.model.loss(torch.from_numpy(x), torch.from_numpy(y))
                self.update.backward(loss / n, last=i == n - 1)
                total += loss.item()
            loss = total / n
        self.update.reduce_gradients()
        self.tp.all_reduce_grads(self._tp_replicated)
        if self.pipeline is not None:
            self.pipeline.reduce_tied_grads()
        self.last_step_info = self.update.apply(lr).as_metrics()
        return loss

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        self.model.eval()
        gen = torch.Generator().manual_seed(seed)
        idx = torch.from_numpy(np.asarray(prompt, np.int64))[None, :]
        model = self.model if self.pipeline is None else self.pipeline.language_model()
        with self.tp.sequence_parallel_off():  # generation lengths need not divide by tp
            return model.generate(idx, max_new_tokens, generator=gen)[0].numpy()

    def full_state(self) -> dict[str, np.ndarray]:
        """The full (unsharded) parameters as float32 numpy arrays, by name.

        Collective over the TP group (and the pipeline group with pp > 1,
        where only the first stage gets every parameter); the checkpoint
        writer uses it.
        """
        state = {name: t.float().cpu().numpy() for name, t in full_state_dict(self.model).items()}
        if self.pipeline is not None:
            state = gather_pipeline_state(state, self.pipeline, self._param_names)
        return state

    def parameter_checksum(self) -> float:
        """Sum of this rank's parameters (its shards under tensor parallelism)."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))


def build_engine(cfg: Config, groups: ParallelGroups, threads: int) -> TorchEngine:
    """Engine for ``hvdllm train``; ``threads`` is this rank's share of the node's cores."""
    torch.set_num_threads(threads)
    return TorchEngine(cfg, groups)
