"""What every Keras language model shares: the next-token loss and sampling."""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def dense(units: int, std: float, name: str, use_bias: bool = False) -> keras.layers.Dense:
    """A Dense layer with a normal(0, ``std``) kernel (no bias by default, as in LLaMA)."""
    return keras.layers.Dense(units, use_bias=use_bias, name=name,
                              kernel_initializer=keras.initializers.RandomNormal(stddev=std))


def cache_length(cache: list | None) -> int:
    """Positions held by a key/value cache (one (keys, values) pair per block; 0 for None)."""
    return int(cache[0][0].shape[2]) if cache else 0


def cached_attention(q: Any, k: Any, v: Any, head_dim: int) -> Any:
    """Softmax attention of the last ``t`` positions ``q`` over every position of ``k``/``v``.

    Args:
        q: (b, heads, t, head_dim), the new positions.
        k, v: (b, heads, total, head_dim), every position so far (the new
            ones last); new query i sees keys up to position total - t + i.
    """
    t, total = int(q.shape[2]), int(k.shape[2])
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / float(np.sqrt(head_dim))
    mask = np.tril(np.ones((t, total), dtype=bool), k=total - t)
    scores = ops.where(mask, scores, float("-inf"))
    return ops.matmul(ops.softmax(scores, axis=-1), v)  # (b, heads, t, head_dim)


class LMCrossEntropy:
    """Mean next-token cross-entropy over every position of the batch.

    A plain object, not a layer: it has no weights, and tensor parallelism
    swaps it for the vocabulary-parallel one
    (:mod:`hvdllm.tensorflow.tensor_parallel`) without the model knowing.

    Args:
        vocab_size: real vocabulary size; logit columns past it (padding
            that lets a vocabulary split evenly) are ignored.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, logits: Any, targets: Any) -> Any:
        # fp32 even when a mixed-precision policy computes the logits in bf16/fp16.
        logits = ops.cast(self.full_logits(logits), "float32")
        return ops.mean(ops.sparse_categorical_crossentropy(targets, logits, from_logits=True))

    def full_logits(self, logits: Any) -> Any:
        """Logits over the whole real vocabulary, as the model produced them."""
        return logits[..., :self.vocab_size]


class CausalLM(keras.Model):
    """A model from token ids ``(b, t)`` to next-token logits ``(b, t, vocab)``.

    Subclasses set ``seq_len`` (the longest context) and ``vocab_size``,
    build ``self.blocks`` (a list of layers ``x -> x``) and implement the
    pieces a pipeline stage may own: ``embed(idx, training) -> x`` and
    ``head(x) -> logits``.  ``call`` chains them.  The loss goes through
    ``self.criterion``, which tensor parallelism may replace.
    """

    seq_len: int
    vocab_size: int

    @property
    def criterion(self) -> LMCrossEntropy:
        crit = self.__dict__.get("_hvdllm_criterion")
        if crit is None:
            crit = LMCrossEntropy(self.vocab_size)
            object.__setattr__(self, "_hvdllm_criterion", crit)
        return crit

    def set_criterion(self, criterion: Any) -> None:
        """Replace the loss (e.g. by the vocabulary-parallel one); not tracked by Keras."""
        object.__setattr__(self, "_hvdllm_criterion", criterion)

    def embed(self, idx: Any, training: bool = False) -> Any:
        raise NotImplementedError

    def head(self, x: Any) -> Any:
        raise NotImplementedError

    #: Recompute every block in backward (keep only its input); set from
    #: ``parallel.recompute = "full"`` without a pipeline (whose executor
    #: recomputes whole chunks itself).
    recompute: bool = False

    def run_blocks(self, x: Any, training: bool = False) -> Any:
        """Every block in order, each under ``tf.recompute_grad`` if :attr:`recompute`."""
        for block in self.blocks:
            if self.recompute and training:
                x = tf.recompute_grad(lambda h, block=block: block(h, training=True))(x)
            else:
                x = block(x, training=training)
        return x

    def call(self, idx: Any, training: bool = False) -> Any:
        self.check_length(idx)
        return self.head(self.run_blocks(self.embed(idx, training=training), training=training))

    def next_token_loss(self, idx: Any, targets: Any, training: bool = False) -> Any:
        """Mean cross-entropy of predicting ``targets`` (b, t) from ``idx`` (b, t)."""
        return self.criterion(self(idx, training=training), targets)

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
            logits = ops.convert_to_numpy(
                self.criterion.full_logits(self(window, training=False)))[0, -1]
            logits = logits.astype(np.float64) / temperature
            if top_k is not None and top_k < logits.size:
                kth = np.sort(logits)[-top_k]
                logits = np.where(logits < kth, -np.inf, logits)
            probs = np.exp(logits - logits.max())
            idx.append(int(rng.choice(logits.size, p=probs / probs.sum())))
        return np.asarray(idx, np.int64)

    def call_cached(self, idx: Any, cache: list | None) -> tuple[Any, list]:
        """Logits (b, t, vocab) of new tokens ``idx`` (b, t) that follow ``cache`` (inference).

        ``cache`` holds one (keys, values) pair per block, each (b, kv_heads,
        positions, head_dim), as a previous call returned it (None: no tokens
        yet); the new tokens take the positions after it.  Returns the logits
        and the extended cache.
        """
        start = cache_length(cache)
        t = int(idx.shape[1])
        if start + t > self.seq_len:
            raise ValueError(f"positions up to {start + t} exceed seq_len {self.seq_len}")
        x = self.embed_at(idx, start)
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block.call_cached(x, start, cache[i] if cache else None)
            present.append(kv)
        return self.head(x), present

    def embed_at(self, idx: Any, start: int) -> Any:
        """Token ids (b, t) at positions ``start ..`` -> residual stream (inference)."""
        raise NotImplementedError

    def check_length(self, idx: Any) -> None:
        t = idx.shape[1]
        if t is not None and t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len {self.seq_len}")
