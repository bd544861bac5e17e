"""The PyTorch training engine: model, tensor parallelism, AdamW and data-parallel sync."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..common.config import Config
from ..common.topology import ParallelGroups
from .data_parallel import GradientSync, broadcast_module
from .distributed import import_horovod
from .models import GPT, CausalLM, GPTConfig, Llama, LlamaConfig
from .tensor_parallel import (TensorParallelGroup, full_state_dict, parallelize,
                              replicated_parameters)


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


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms or positions' 1-D params)."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
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
    """

    def __init__(self, cfg: Config, groups: ParallelGroups):
        self.cfg = cfg
        self.groups = groups
        hvd = import_horovod()
        self.model = build_model(cfg)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.tp = TensorParallelGroup(groups.tp, cfg.parallel.sequence_parallel, hvd=hvd)
        parallelize(self.model, self.tp)
        self._tp_replicated = (replicated_parameters(self.model)
                               if self.tp.sequence_parallel else [])
        broadcast_module(self.model, groups.dp, hvd)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sync = GradientSync(self.model.named_parameters(), groups.dp, hvd)

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   lr: float) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = 0.0
        for i, (x, y) in enumerate(micro_batches):
            loss = self.model.loss(torch.from_numpy(x), torch.from_numpy(y))
            if i == n - 1:
                with self.sync.sync():
                    (loss / n).backward()
            else:
                (loss / n).backward()
            total += loss.item()
        self.sync.wait()
        self.tp.all_reduce_grads(self._tp_replicated)
        self.optimizer.step()
        return total / n

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int) -> np.ndarray:
        self.model.eval()
        gen = torch.Generator().manual_seed(seed)
        idx = torch.from_numpy(np.asarray(prompt, np.int64))[None, :]
        with self.tp.sequence_parallel_off():  # generation lengths need not divide by tp
            return self.model.generate(idx, max_new_tokens, generator=gen)[0].numpy()

    def full_state(self) -> dict[str, np.ndarray]:
        """The full (unsharded) parameters as float32 numpy arrays, by name.

        Collective over the TP group; the checkpoint writer uses it.
        """
        return {name: t.float().cpu().numpy() for name, t in full_state_dict(self.model).items()}

    def parameter_checksum(self) -> float:
        """Sum of this rank's parameters (its shards under tensor parallelism)."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))


def build_engine(cfg: Config, groups: ParallelGroups, threads: int) -> TorchEngine:
    """Engine for ``hvdllm train``; ``threads`` is this rank's share of the node's cores."""
    torch.set_num_threads(threads)
    return TorchEngine(cfg, groups)
