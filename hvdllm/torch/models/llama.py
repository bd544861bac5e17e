"""A LLaMA-family language model in plain PyTorch.

RMSNorm, rotary position embeddings (RoPE, in the "rotate half" layout that
Hugging Face checkpoints use), a SwiGLU MLP, grouped-query attention and an
untied output head; no biases anywhere.  As in :mod:`.gpt`, no parallel code
lives here, blocks are keyed by layer index, and attention reads its local
query and key/value head counts off the tensor shapes so that a
tensor-parallel slice of the heads runs the same code.
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
class LlamaConfig:
    family: ClassVar[str] = "llama"
    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 0  # 0 = n_head
    d_model: int = 64
    d_ff: int = 0  # 0 = the family default, 8/3 * d_model rounded up to a multiple of 64
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_width(self) -> int:
        return self.d_ff or default_d_ff(self.family, self.d_model)

    @classmethod
    def from_model_config(cls, m: ModelConfig) -> "LlamaConfig":
        """The reference model's config for a ``[model]`` section (d_ff, n_kv_head resolved).

        Args:
            m: the model section; its family must be "llama".
        """
        return cls(vocab_size=m.vocab_size, seq_len=m.seq_len, n_layer=m.n_layer,
                   n_head=m.n_head, n_kv_head=m.kv_heads, d_model=m.d_model, d_ff=m.ff_width,
                   dropout=m.dropout, init_std=m.init_std, norm_eps=m.norm_eps,
                   rope_theta=m.rope_theta)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast; scale in the input dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq_len, head_dim) for rotate-half RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, heads, t, head_dim) by position: pairs are (i, i + head_dim/2)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        b, t, _ = q.shape  # t is the whole sequence even when x holds a part of it
        # (b, t, heads * head_dim) -> (b, heads, t, head_dim)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t])
        # Grouped-query attention: query head h reads key/value head h // group.
        group = q.size(1) // k.size(1)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       past: KV | None) -> tuple[torch.Tensor, KV]:
        """Attention of new positions ``x`` (b, t, d) over ``past`` and themselves.

        ``cos``/``sin`` are the rotary rows of the new positions.  The cache
        holds the rotated keys and the values of the ``n_kv_head`` heads,
        each (b, kv_heads, past + t, head_dim), before the group repeat.
        """
        b, t, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        group = q.size(1) // k.size(1)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=offset_causal_mask(t, k.size(2),
                                                                                 x.device))
        return self.wo(y.transpose(1, 2).reshape(b, t, -1)), present


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.w_down = nn.Linear(cfg.ff_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       past: KV | None) -> tuple[torch.Tensor, KV]:
        """``forward`` for new positions after ``past`` (inference: no dropout)."""
        a, present = self.attn.forward_cached(self.attn_norm(x), cos, sin, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present


class Llama(CausalLM):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = cfg.seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.criterion = LMCrossEntropy(cfg.vocab_size)
        cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_head, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = cfg.init_std
                if name.endswith(("wo.weight", "w_down.weight")):
                    std /= math.sqrt(2 * cfg.n_layer)  # residual projections, as in GPT-2
                nn.init.normal_(p, mean=0.0, std=std)

    # The three pieces a pipeline stage may own; forward() chains them.
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (b, t) -> residual stream (b, t, d)."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len {self.cfg.seq_len}")
        return self.drop(self.tok_emb(idx))

    def run_block(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[key](x, self.rope_cos, self.rope_sin)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream -> logits (b, t, vocab)."""
        return self.lm_head(self.norm(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (b, t) -> logits (b, t, vocab)."""
        return self.head(self.run_blocks(self.embed(idx)))

    def forward_cached(self, idx: torch.Tensor,
                       cache: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
        """Logits (b, t, vocab) of new tokens ``idx`` (b, t) that follow ``cache``.

        As :meth:`GPT.forward_cached`; the new tokens are rotated by their
        absolute positions, ``len(cache) ..``.
        """
        start = cache_length(cache)
        t = idx.shape[1]
        if start + t > self.cfg.seq_len:
            raise ValueError(f"positions up to {start + t} exceed seq_len {self.cfg.seq_len}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.tok_emb(idx)
        present = []
        for i, key in enumerate(self.blocks):
            x, kv = self.blocks[key].forward_cached(x, cos, sin, cache[i] if cache else None)
            present.append(kv)
        return self.head(x), present
