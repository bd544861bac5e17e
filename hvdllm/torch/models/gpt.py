"""A GPT-2 style language model in plain PyTorch.

Learned positions, pre-LayerNorm blocks, a tanh-GELU MLP (GPT-2's
"gelu_new") and an output head tied to the token embedding.  No parallel
code lives here: data, tensor and pipeline parallelism are applied from
outside.  Blocks sit in a ModuleDict keyed by layer index so that a
pipeline stage can keep only its own layers while parameter names stay
stable.  Attention reads its local head count off the tensor shapes, so a
tensor-parallel shard of ``qkv`` (a slice of the heads) runs the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...common.config import ModelConfig
from ...common.family import default_d_ff
from .base import KV, CausalLM, LMCrossEntropy, cache_length, offset_causal_mask


@dataclass
class GPTConfig:
    family: ClassVar[str] = "gpt"
    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 0  # 0 = the family default, 4 * d_model
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-5

    @property
    def kv_heads(self) -> int:
        """Key/value heads: every query head has its own."""
        return self.n_head

    @property
    def ff_width(self) -> int:
        return self.d_ff or default_d_ff(self.family, self.d_model)

    @classmethod
    def from_model_config(cls, m: ModelConfig) -> "GPTConfig":
        """The reference model's config for a ``[model]`` section (d_ff resolved).

        Args:
            m: the model section; its family must be "gpt".
        """
        return cls(vocab_size=m.vocab_size, seq_len=m.seq_len, n_layer=m.n_layer,
                   n_head=m.n_head, d_model=m.d_model, d_ff=m.ff_width, dropout=m.dropout,
                   init_std=m.init_std, norm_eps=m.norm_eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows: all q, all k, all v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        b, t, _ = qkv.shape  # t is the whole sequence even when x holds a part of it
        q, k, v = qkv.chunk(3, dim=-1)
        # (b, t, heads * head_dim) -> (b, heads, t, head_dim)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """Attention of the new positions ``x`` (b, t, d) over ``past`` keys/values and themselves.

        Returns the output and the keys/values of every position so far,
        each (b, heads, past + t, head_dim).
        """
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=offset_causal_mask(t, k.size(2),
                                                                                 x.device))
        return self.proj(y.transpose(1, 2).reshape(b, t, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff_width)
        self.proj = nn.Linear(cfg.ff_width, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))

    def forward_cached(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """``forward`` for new positions after ``past`` (inference: no dropout)."""
        a, present = self.attn.forward_cached(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(CausalLM):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = cfg.seq_len
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.criterion = LMCrossEntropy(cfg.vocab_size)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # The three pieces a pipeline stage may own; forward() chains them.
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (b, t) -> residual stream (b, t, d)."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len {self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def run_block(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[key](x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream -> logits (b, t, vocab)."""
        return self.lm_head(self.ln_f(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (b, t) -> logits (b, t, vocab)."""
        return self.head(self.run_blocks(self.embed(idx)))

    def forward_cached(self, idx: torch.Tensor,
                       cache: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
        """Logits (b, t, vocab) of new tokens ``idx`` (b, t) that follow ``cache``.

        ``cache`` holds one (keys, values) pair per block, as a previous call
        returned it (None: no tokens yet); the new tokens take the positions
        after it.  Returns the logits and the extended cache.
        """
        start = cache_length(cache)
        t = idx.shape[1]
        if start + t > self.cfg.seq_len:
            raise ValueError(f"positions up to {start + t} exceed seq_len {self.cfg.seq_len}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        present = []
        for i, key in enumerate(self.blocks):
            x, kv = self.blocks[key].forward_cached(x, cache[i] if cache else None)
            present.append(kv)
        return self.head(x), present
