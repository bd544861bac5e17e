"""The LLaMA family in Keras 3: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head.

The same function as :mod:`hvdllm.torch.models.llama`; its variables map
one to one onto the model contract's names (:mod:`hvdllm.common.family`).
"""
from __future__ import annotations

import math
from typing import Any

import keras

from .base import CausalLM
from .llama_block import LlamaBlock
from .rms_norm import RMSNorm


@keras.saving.register_keras_serializable(package="hvdllm")
class Llama(CausalLM):
    """Token ids ``(b, t)`` -> next-token logits ``(b, t, vocab_size)``.

    Args:
        vocab_size: number of token ids.
        seq_len: longest context the model accepts.
        n_layer: blocks.
        n_head: query heads per block.
        n_kv_head: key/value heads (0 = ``n_head``).
        d_model: residual stream width.
        d_ff: SwiGLU hidden width.
        dropout: dropout rate (embeddings, attention, residual branches).
        init_std: standard deviation of the normal initialisation; the two
            residual projections of each block use ``init_std / sqrt(2 * n_layer)``.
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
    """

    def __init__(self, vocab_size: int = 256, seq_len: int = 64, n_layer: int = 2,
                 n_head: int = 4, n_kv_head: int = 0, d_model: int = 64, d_ff: int = 192,
                 dropout: float = 0.0, init_std: float = 0.02, norm_eps: float = 1e-5,
                 rope_theta: float = 10000.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.vocab_size, self.seq_len, self.n_layer = vocab_size, seq_len, n_layer
        self.n_head, self.n_kv_head, self.d_model = n_head, n_kv_head or n_head, d_model
        self.d_ff, self.dropout, self.init_std = d_ff, dropout, init_std
        self.norm_eps, self.rope_theta = norm_eps, rope_theta

    @classmethod
    def from_model_config(cls, m: Any) -> "Llama":
        """The model for a ``[model]`` section (``d_ff`` and ``n_kv_head`` resolved)."""
        return cls(vocab_size=m.vocab_size, seq_len=m.seq_len, n_layer=m.n_layer,
                   n_head=m.n_head, n_kv_head=m.kv_heads, d_model=m.d_model, d_ff=m.ff_width,
                   dropout=m.dropout, init_std=m.init_std, norm_eps=m.norm_eps,
                   rope_theta=m.rope_theta)

    def build(self, input_shape: tuple = (None, None)) -> None:
        hidden_shape = tuple(input_shape) + (self.d_model,)
        init = keras.initializers.RandomNormal(stddev=self.init_std)
        self.tok_emb = keras.layers.Embedding(self.vocab_size, self.d_model, name="tok_emb",
                                              embeddings_initializer=init)
        self.tok_emb.build(input_shape)
        self.embedding_dropout = keras.layers.Dropout(self.dropout, name="embedding_dropout")
        proj_init_std = self.init_std / math.sqrt(2 * self.n_layer)
        self.blocks = []
        for i in range(self.n_layer):
            block = LlamaBlock(self.d_model, self.n_head, self.d_ff, self.n_kv_head,
                               self.seq_len, self.rope_theta, self.norm_eps, self.dropout,
                               self.init_std, proj_init_std, name=f"block_{i}")
            block.build(hidden_shape)
            self.blocks.append(block)
        self.norm = RMSNorm(self.norm_eps, name="norm")
        self.norm.build(hidden_shape)
        self.lm_head = keras.layers.Dense(self.vocab_size, use_bias=False, name="lm_head",
                                          kernel_initializer=init)
        self.lm_head.build(hidden_shape)
        super().build(input_shape)

    def embed(self, idx: Any, training: bool = False) -> Any:
        return self.embedding_dropout(self.tok_emb(idx), training=training)

    def embed_at(self, idx: Any, start: int) -> Any:
        return self.tok_emb(idx)  # positions enter through the rotary tables

    def head(self, x: Any) -> Any:
        return self.lm_head(self.norm(x))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"vocab_size": self.vocab_size, "seq_len": self.seq_len,
                       "n_layer": self.n_layer, "n_head": self.n_head,
                       "n_kv_head": self.n_kv_head, "d_model": self.d_model, "d_ff": self.d_ff,
                       "dropout": self.dropout, "init_std": self.init_std,
                       "norm_eps": self.norm_eps, "rope_theta": self.rope_theta})
        return config
