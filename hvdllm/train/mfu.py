"""Model FLOPs utilisation: the model's FLOPs per token and a rank's peak FLOP/s.

Training FLOPs per token (forward and backward) are taken as

    6 * N + 12 * L * H * Q * T

with ``N`` the parameters that take part in matrix products: every
parameter except the token and position embedding tables (a lookup costs
no multiply-adds), with the output head counted once even when it is tied
to the token embedding (it is a real ``d_model x vocab`` product).  ``L``
layers, ``H`` query heads, ``Q`` head size, ``T`` sequence length: the
attention scores and their weighted sum.  Norms, activations, softmax and
recomputation are not counted (it is model FLOPs, not hardware FLOPs).

``mfu = tokens_per_sec / world * flops_per_token / peak_flops``, the
fraction of one rank's peak each rank achieves on average.
"""
from __future__ import annotations

import time

import numpy as np

from ..common.config import ModelConfig
from ..common.family import family_spec

#: Dense bf16 peak FLOP/s of known GPUs (fp16 tensor cores for the V100), matched by name.
GPU_PEAK_FLOPS = (("H100", 989e12), ("A100", 312e12), ("V100", 125e12))

_LOOKUP_ROLES = ("embedding", "positions")


def matmul_parameters(m: ModelConfig) -> int:
    """``N``: parameters that take part in matrix products (see the module docstring)."""
    total = 0
    for tensor in family_spec(m):
        if tensor.role in _LOOKUP_ROLES:
            continue
        total += int(np.prod(tensor.shape))
    return total


def flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token: ``6 N + 12 L H Q T``."""
    head_dim = m.d_model // m.n_head
    return 6.0 * matmul_parameters(m) + 12.0 * m.n_layer * m.n_head * head_dim * m.seq_len


def gpu_peak(device_name: str | None) -> float | None:
    """The table's peak for a CUDA device name, or None when it is not in the table."""
    if not device_name:
        return None
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def _matmul(framework: str):
    """A float32 matmul in ``framework`` (its thread pool is the rank's), numpy otherwise."""
    if framework == "torch":
        import torch

        return lambda a, b: torch.mm(torch.from_numpy(a), torch.from_numpy(b))
    if framework == "tensorflow":
        import tensorflow as tf

        return lambda a, b: tf.linalg.matmul(a, b).numpy()
    return np.matmul


def measure_cpu_peak(framework: str = "", size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``size x size`` matmuls (after a warm-up)."""
    rng = np.random.default_rng(0)  # a private generator: no global random state moves
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    matmul = _matmul(framework)
    matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / max(best, 1e-9)


def resolve_peak(configured: float, device_name: str | None,
                 framework: str = "") -> tuple[float, str]:
    """(peak FLOP/s of one rank, where it came from) for ``train.peak_flops``.

    Args:
        configured: ``train.peak_flops`` (0 = auto).
        device_name: the CUDA device the model computes on, or None on CPU.
        framework: whose matmul to time when measuring.
    """
    if configured > 0:
        return configured, "train.peak_flops"
    flops = gpu_peak(device_name)
    if flops is not None:
        return flops, f"{device_name}, bf16 table value"
    return measure_cpu_peak(framework), "measured fp32 matmul"


def compute_device_name(framework: str) -> str | None:
    """The CUDA device the engine computes on, or None (CPU).

    The torch engine keeps its tensors on the CPU; TensorFlow places ops on
    a visible GPU by itself.
    """
    if framework != "tensorflow":
        return None
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    except Exception:  # noqa: BLE001 - no usable device description: measure instead
        return None
