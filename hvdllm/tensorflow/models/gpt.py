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
import numpy as np
from keras import ops

from .position_embedding import PositionEmbedding
from .transformer_block import LAYER_NORM_EPSILON, TransformerBlock


@keras.saving.register_keras_serializable(package="hvdllm")
class GPT(keras.Model):
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

    def call(self, idx: Any, training: bool = False) -> Any:
        t = idx.shape[1]
        if t is not None and t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len {self.seq_len}")
        tok = self.token_embedding(idx)  # (b, t, d_model)
        x = self.embedding_dropout(tok + self.position_embedding(tok), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        # Tied head: score every token by its embedding.
        return ops.matmul(self.ln_f(x), ops.transpose(self.token_embedding.embeddings))

    def next_token_loss(self, idx: Any, targets: Any, training: bool = False) -> Any:
        """Mean cross-entropy of predicting ``targets`` (b, t) from ``idx`` (b, t)."""
        logits = self(idx, training=training)
        return ops.mean(ops.sparse_categorical_crossentropy(targets, logits, from_logits=True))

    def generate(self, prompt: np.ndarray, max_new_tokens: int, seed: int,
                 temperature: float = 0.8, top_k: int | None = 40) -> np.ndarray:
        """Sample ``max_new_tokens`` after ``prompt`` (1-D ints); returns prompt + samples.

        Args:
            prompt: token ids to continue.
            max_new_tokens: how many tokens to append.
            seed: seed of the sampler; the same seed gives the same text.
            temperature: divides the logits; below 1 sharpens the distribution.
            top_k: sample only among the ``top_k`` most likely tokens.
        """
        rng = np.random.default_rng(seed)
        idx = [int(t) for t in np.asarray(prompt).reshape(-1)]
        for _ in range(max_new_tokens):
            window = np.asarray(idx[-self.seq_len:], np.int64)[None, :]
            logits = ops.convert_to_numpy(self(window, training=False))[0, -1]
            logits = logits.astype(np.float64) / temperature
            if top_k is not None and top_k < logits.size:
                kth = np.sort(logits)[-top_k]
                logits = np.where(logits < kth, -np.inf, logits)
            probs = np.exp(logits - logits.max())
            idx.append(int(rng.choice(logits.size, p=probs / probs.sum())))
        return np.asarray(idx, np.int64)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"vocab_size": self.vocab_size, "seq_len": self.seq_len,
                       "n_layer": self.n_layer, "n_head": self.n_head, "d_model": self.d_model,
                       "dropout": self.dropout, "init_std": self.init_std, "d_ff": self.d_ff,
                       "norm_eps": self.norm_eps})
        return config
