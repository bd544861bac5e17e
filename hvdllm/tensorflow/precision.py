"""Mixed precision for TensorFlow: Keras dtype policies over fp32 variables.

The variables stay fp32 and are the master weights: the optimizer updates
them in fp32.  Under a Keras ``mixed_*`` dtype policy every layer computes
in the low-precision type and reads its fp32 variables cast to it, so the
gradients that reach the variables are fp32.

* ``bf16``: policy ``"mixed_bfloat16"``; bf16 has fp32's exponent range,
  so no loss scaling.
* ``fp16``: policy ``"mixed_float16"`` with dynamic loss scaling
  (:class:`hvdllm.common.loss_scale.DynamicLossScale`).  The engine
  multiplies the loss by :attr:`MixedPrecision.scale` before taking
  gradients; afterwards :meth:`MixedPrecision.found_inf` takes the MAX of
  this rank's overflow flag over the **world** group, so every rank (every
  dp, tp and pp coordinate) skips the same steps and keeps the same scale.
  Keras's own ``LossScaleOptimizer`` is not used: its decision is per rank.
* ``fp32``: no policy, nothing to do.

The loss must be computed in fp32: :func:`float32_criterion` wraps a
model's criterion so the logits are cast up first.

How the engine uses it::

    policy = precision_policy(cfg)
    if policy:
        keras.mixed_precision.set_global_policy(policy)   # before building the model
    model = build_model(cfg)
    model.set_criterion(float32_criterion(model.criterion))
    # GradientUpdate then owns a MixedPrecision over groups.world
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..common.comm import Group
from ..common.loss_scale import DynamicLossScale, check_precision

#: Keras dtype policy of each ``train.precision``.
POLICIES = {"fp32": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def precision_policy(cfg: Any) -> str | None:
    """The Keras dtype policy name for ``cfg.train.precision`` (None for fp32).

    Set it with ``keras.mixed_precision.set_global_policy`` before the
    model is built: fp32 variables, low-precision compute.

    Args:
        cfg: the run's config (or a ``train.precision`` string).
    """
    precision = cfg if isinstance(cfg, str) else cfg.train.precision
    check_precision(precision)
    return POLICIES[precision]


class Float32Criterion:
    """A loss that casts the logits to float32 before ``criterion`` sees them.

    Keeps the criterion interface: ``__call__(logits, targets)`` and
    ``full_logits(logits)``.

    Args:
        criterion: the model's loss object.
    """

    def __init__(self, criterion: Any):
        self.criterion = criterion

    def __call__(self, logits: Any, targets: Any) -> Any:
        import tensorflow as tf

        return self.criterion(tf.cast(logits, tf.float32), targets)

    def full_logits(self, logits: Any) -> Any:
        return self.criterion.full_logits(logits)


def float32_criterion(criterion: Any) -> Any:
    """``criterion`` computing in float32 whatever the logits' dtype (not wrapped twice)."""
    return criterion if isinstance(criterion, Float32Criterion) else Float32Criterion(criterion)


class MixedPrecision:
    """The fp16 loss scale, with the overflow flag agreed over the world.

    Args:
        precision: "fp32", "bf16" or "fp16" (``train.precision``).
        world: the world group (every rank of the job); None in a
            single-process run.
        loss_scale: fp16 loss-scale state; defaults to
            ``DynamicLossScale()`` (2**16, x2 every 2000 clean steps, x0.5
            on overflow).
    """

    def __init__(self, precision: str, world: Group | None,
                 loss_scale: DynamicLossScale | None = None):
        check_precision(precision)
        self.precision = precision
        self.world = world
        self.loss_scale = (loss_scale or DynamicLossScale()) if precision == "fp16" else None

    @property
    def policy(self) -> str | None:
        """The Keras dtype policy name of this precision."""
        return POLICIES[self.precision]

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 unless fp16)."""
        return self.loss_scale.scale if self.loss_scale is not None else 1.0

    def found_inf(self, local: bool) -> bool:
        """Whether any rank of the world found inf or nan (MAX of ``local`` over the world).

        Collective over the world in fp16; returns False without
        communication otherwise.

        Args:
            local: whether this rank's gradients hold inf or nan.
        """
        if self.loss_scale is None:
            return False
        if self.world is not None and self.world.size > 1:
            flag = self.world.allreduce(np.array([int(local)], np.int32), "max")
            return bool(flag[0])
        return bool(local)

    def update(self, found_inf: bool) -> bool:
        """Advance the loss scale after a step; returns True if the step was applied.

        Args:
            found_inf: the agreed flag :meth:`found_inf` returned.
        """
        if self.loss_scale is None:
            return True
        return self.loss_scale.update(found_inf)
