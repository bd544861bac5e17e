"""What every Keras language model shares: the next-token loss and sampling."""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


def dense(units: int, std: float, name: str, use_bias: bool = False) -> keras.layers.Dense:
    """A Dense layer with a normal(0, ``std``) kernel (no bias by default, as in LLaMA)."""
    return keras.layers.Dense(units, use_bias=use_bias, name=name,
                              kernel_initializer=keras.initializers.RandomNormal(stddev=std))


class CausalLM(keras.Model):
    """A model from token ids ``(b, t)`` to next-token logits ``(b, t, vocab)``.

    Subclasses set ``seq_len`` (the longest context) and implement ``call``.
    """

    seq_len: int

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

    def check_length(self, idx: Any) -> None:
        t = idx.shape[1]
        if t is not None and t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len {self.seq_len}")
