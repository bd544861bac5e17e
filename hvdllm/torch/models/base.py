"""What the reference language models share: the loss head and sampling.

A model's ``forward`` ends in ``self.lm_head`` and returns logits; its loss
goes through ``self.criterion``.  Both are ordinary submodules, so
tensor parallelism can swap them for vocabulary-sharded versions (see
:mod:`hvdllm.torch.tensor_parallel`) without the model file knowing.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...common.family import ModelSpec, family_spec


#: One block's key/value cache: keys and values, each (b, kv_heads, positions, head_dim).
KV = tuple[torch.Tensor, torch.Tensor]


def cache_length(cache: list[KV] | None) -> int:
    """Positions held by a key/value cache (0 for None)."""
    return int(cache[0][0].shape[2]) if cache else 0


def offset_causal_mask(t: int, total: int, device: torch.device) -> torch.Tensor:
    """(t, total) boolean mask: new query i (position total - t + i) sees keys 0..that position."""
    return torch.ones(t, total, dtype=torch.bool, device=device).tril(diagonal=total - t)


class LMCrossEntropy(nn.Module):
    """Mean next-token cross-entropy over every position of the batch.

    Args:
        vocab_size: real vocabulary size.  Logit columns past it (padding
            added so that a vocabulary splits evenly) are ignored.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits[..., :self.vocab_size]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole real vocabulary, as ``forward`` produced them."""
        return logits[..., :self.vocab_size]


class CausalLM(nn.Module):
    """Loss and sampling on top of a subclass's ``forward(idx) -> logits``.

    Subclasses split ``forward`` into ``embed(idx) -> x``,
    ``run_block(key, x) -> x`` for each key of ``self.blocks`` and
    ``head(x) -> logits``, the pieces a pipeline stage may own, and chain
    the blocks with :meth:`run_blocks`.

    Attributes:
        recompute: checkpoint every block in :meth:`run_blocks` (keep only
            its input for backward and run it again there).  The pipeline
            executor recomputes whole chunks itself and leaves this off.
    """

    criterion: LMCrossEntropy
    max_seq_len: int
    cfg: Any
    recompute: bool = False

    @property
    def spec(self) -> ModelSpec:
        """The model's family contract (names, shapes, splits, ties) for the full model."""
        return family_spec(self.cfg)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Every block of ``self.blocks`` in order, each recomputed in backward if ``recompute``."""
        recompute = self.recompute and torch.is_grad_enabled()
        for key in self.blocks:
            if recompute:
                x = checkpoint(self.run_block, key, x, use_reentrant=False)
            else:
                x = self.run_block(key, x)
        return x

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting ``targets`` (b, t) from ``idx`` (b, t)."""
        return self.criterion(self(idx), targets)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (b, t)."""
        for _ in range(max_new_tokens):
            logits = self.criterion.full_logits(self(idx[:, -self.max_seq_len:]))
            logits = logits[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
