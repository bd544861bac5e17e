"""A GPT-2 style language model as a Keras 3 model.

Learned positions, pre-LayerNorm blocks, GELU MLP and an output head tied to
the token embedding.  No parallel code lives here: data, tensor and pipeline
parallelism are applied from outside.  Blocks are named by layer index
(``block_0``, ``block_1``, ...) so that a pipeline stage can keep only its
own layers while weight names stay stable.

Weights are drawn when the model is built, from Keras' global seed: call
``keras.utils.set_random_seed(seed)`` first to get the same weights in every
process.
"""
from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from .base import CausalLM
from .position_embedding import PositionEmbedding
from .transformer_block import LAYER_NORM_EPSILON, TransformerBlock


@keras.saving.register_keras_serializable(package="hvdllm")
class GPT(CausalLM):
    """Token ids ``(b, t)`` -> next-token logits ``(b, t, vocab_size)``.

    Args:
        vocab_size: number of token ids.
        seq_len: longest context the model accepts.
        n_layer: transformer blocks.
        n_head: attention heads per block.
        d_model: residual stream width.
        dropout: dropout rate (embeddings, attention, residual branches).
        init_std: standard deviation of the normal initialisation; the two
            residual projections of each block use ``init_std / sqrt(2 * n_layer)``.
        d_ff: MLP hidden width (0: ``4 * d_model``).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, vocab_size: int = 256, seq_len: int = 64, n_layer: int = 2,
                 n_head: int = 4, d_model: int = 64, dropout: float = 0.0,
                 init_std: float = 0.02, d_ff: int = 0, norm_eps: float = LAYER_NORM_EPSILON,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.d_ff = d_ff or 4 * d_model
        self.norm_eps = norm_eps
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.dropout = dropout
        self.init_std = init_std

    @classmethod
    def from_model_config(cls, m: Any) -> "GPT":
        """The model for a ``[model]`` section (``d_ff`` resolved)."""
        return cls(vocab_size=m.vocab_size, seq_len=m.seq_len, n_layer=m.n_layer,
                   n_head=m.n_head, d_model=m.d_model, dropout=m.dropout, init_std=m.init_std,
                   d_ff=m.ff_width, norm_eps=m.norm_eps)

    def build(self, input_shape: tuple = (None, None)) -> None:
        hidden_shape = tuple(input_shape) + (self.d_model,)
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.d_model, name="token_embedding",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=self.init_std))
        self.token_embedding.build(input_shape)
        self.position_embedding = PositionEmbedding(self.seq_len, init_std=self.init_std,
                                                    name="position_embedding")
        self.position_embedding.build(hidden_shape)
        self.embedding_dropout = keras.layers.Dropout(self.dropout, name="embedding_dropout")
        # GPT-2: shrink the residual projections so the stream's variance stays put with depth.
        proj_init_std = self.init_std / math.sqrt(2 * self.n_layer)
        self.blocks = []
        for i in range(self.n_layer):
            block = TransformerBlock(self.d_model, self.n_head, dropout=self.dropout,
                                     init_std=self.init_std, proj_init_std=proj_init_std,
                                     d_ff=self.d_ff, norm_eps=self.norm_eps, name=f"block_{i}")
            block.build(hidden_shape)
            self.blocks.append(block)
        self.ln_f = keras.layers.LayerNormalization(epsilon=self.norm_eps, name="ln_f")
        self.ln_f.build(hidden_shape)
        super().build(input_shape)

    def embed(self, idx: Any, training: bool = False) -> Any:
        tok = self.token_embedding(idx)  # (b, t, d_model)
        return self.embedding_dropout(tok + self.position_embedding(tok), training=training)

    def embed_at(self, idx: Any, start: int) -> Any:
        tok = self.token_embedding(idx)
        return tok + self.position_embedding.embeddings[start:start + int(idx.shape[1])]

    def head(self, x: Any) -> Any:
        # Tied head: score every token by its embedding.
        return ops.matmul(self.ln_f(x), ops.transpose(self.token_embedding.embeddings))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"vocab_size": self.vocab_size, "seq_len": self.seq_len,
                       "n_layer": self.n_layer, "n_head": self.n_head, "d_model": self.d_model,
                       "dropout": self.dropout, "init_std": self.init_std, "d_ff": self.d_ff,
                       "norm_eps": self.norm_eps})
        return config
