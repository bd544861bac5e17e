"""Global gradient-norm clipping over a dp x tp x pp layout (TensorFlow).

The rule of :mod:`hvdllm.torch.clip`: the global norm is the norm of the
whole model's gradient, each parameter counted exactly once:

* a variable whose attribute ``hvdllm_tp_sharded`` is True is one TP shard
  of a larger weight, so its squared norm is summed over the TP group;
* every other variable is replicated on each TP rank and counted once;
* pipeline stages hold different variables, so squared norms are summed
  over the PP group; the last stage's copy of a tied embedding
  (``hvdllm_pp_duplicate``) is counted on the first stage only;
* DP replicas hold identical, already averaged gradients, so nothing is
  summed over DP.

Every rank then holds the same norm and scales its gradients by the same
``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
does for one process.

How the engine uses it: :class:`hvdllm.tensorflow.update.GradientUpdate`
clips when ``train.grad_clip > 0`` (on the gradient shards under ZeRO-1,
:meth:`hvdllm.tensorflow.zero.ZeroAdamW.clip_grad_norm`).  The squared sums
(:func:`squared_norm_parts`) are plain TensorFlow ops and may run inside a
``tf.function``; the reduction over tp and pp is eager (mpi4py, with deadlines).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import tensorflow as tf

from ..common.comm import Group
from ..common.grad_update import (PP_DUPLICATE_ATTR, TP_SHARDED_ATTR,  # noqa: F401
                                  clip_coefficient, combine_squared_norms)



def is_tp_sharded(variable: Any) -> bool:
    """Whether ``variable`` holds one tensor-parallel shard (summed over TP in norms)."""
    return bool(getattr(variable, TP_SHARDED_ATTR, False))


def is_pp_duplicate(variable: Any) -> bool:
    """Whether ``variable`` is a pipeline stage's second copy of a tied tensor (not counted)."""
    return bool(getattr(variable, PP_DUPLICATE_ATTR, False))


def squared_norm_parts(grads: Sequence[tf.Tensor], variables: Sequence[Any]) -> tf.Tensor:
    """``[tp-sharded, replicated]`` squared norms of this rank's gradients, float64.

    Pipeline duplicates and missing (None) gradients are left out.  Works in
    eager code and inside ``tf.function``.

    Args:
        grads: one gradient (or None) per variable.
        variables: the variables, carrying the metadata attributes.
    """
    sums = [tf.zeros([], tf.float64), tf.zeros([], tf.float64)]
    for g, v in zip(grads, variables):
        if g is None or is_pp_duplicate(v):
            continue
        g64 = tf.cast(tf.convert_to_tensor(g), tf.float64)
        sums[0 if is_tp_sharded(v) else 1] += tf.reduce_sum(g64 * g64)
    return tf.stack(sums)


def global_grad_norm(grads: Sequence[tf.Tensor], variables: Sequence[Any],
                     tp_group: Group | None = None, pp_group: Group | None = None) -> float:
    """L2 norm of the whole model's gradient over the layout (collective over tp and pp).

    Args:
        grads: this rank's gradients, one (or None) per variable.
        variables: this rank's variables.
        tp_group: tensor-parallel group, or None.
        pp_group: pipeline-parallel group, or None.
    """
    sharded, replicated = (float(x) for x in squared_norm_parts(grads, variables).numpy())
    return math.sqrt(combine_squared_norms(sharded, replicated, tp_group, pp_group))


def clip_by_global_norm(grads: Sequence[tf.Tensor], variables: Sequence[Any], max_norm: float,
                        tp_group: Group | None = None,
                        pp_group: Group | None = None) -> tuple[list, float]:
    """Scale gradients so the global norm is at most ``max_norm``; returns them and the norm.

    Collective over ``tp_group`` and ``pp_group``: every rank of the layout
    must call it at the same point of the step.

    Args:
        grads: this rank's gradients, one (or None) per variable.
        variables: this rank's variables.
        max_norm: largest allowed global L2 norm.
        tp_group: tensor-parallel group, or None.
        pp_group: pipeline-parallel group, or None.
    """
    total = global_grad_norm(grads, variables, tp_group, pp_group)
    coef = clip_coefficient(total, max_norm)
    if coef < 1.0:
        grads = [None if g is None else tf.convert_to_tensor(g) * coef for g in grads]
    return list(grads), total
