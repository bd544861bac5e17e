"""Rotary position embeddings in the "rotate half" layout Hugging Face checkpoints use."""
from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of shape (seq_len, head_dim), float32.

    Args:
        seq_len: positions.
        head_dim: size of one attention head (even).
        theta: the rotary base (``model.rope_theta``).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    angles = np.outer(np.arange(seq_len, dtype=np.float32), inv_freq).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """Rotate ``x`` (b, heads, t, head_dim) by position; pairs are (i, i + head_dim / 2).

    Args:
        x: queries or keys.
        cos, sin: tables cut to ``t`` rows (float32; cast to ``x``'s dtype under
            a mixed-precision policy).
    """
    cos, sin = ops.cast(cos, x.dtype), ops.cast(sin, x.dtype)
    first, second = ops.split(x, 2, axis=-1)
    rotated = ops.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
