"""What both adapters' gradient updates share, framework-free (numpy only).

* :class:`StepInfo`: what one optimizer step did, for ``metrics.jsonl``;
* the global-norm rule of clipping over dp x tp x pp: the variable tags
  that say how a tensor is held (:data:`TP_SHARDED_ATTR`,
  :data:`PP_DUPLICATE_ATTR`), :func:`combine_squared_norms` and
  :func:`clip_coefficient`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .comm import Group

TP_SHARDED_ATTR = "hvdllm_tp_sharded"
# The last pipeline stage's copy of a tied embedding: counted on the first stage only.
PP_DUPLICATE_ATTR = "hvdllm_pp_duplicate"


@dataclass
class StepInfo:
    """What one optimizer step did, for metrics."""

    applied: bool = True
    grad_norm: float | None = None
    comm_bytes: int = 0
    loss_scale: float | None = None

    def as_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"comm_bytes": self.comm_bytes}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
            out["skipped"] = not self.applied
        return out


def combine_squared_norms(tp_sharded_sq: float, replicated_sq: float, tp_group: Group | None,
                          pp_group: Group | None) -> float:
    """The global squared norm from this rank's two partial sums.

    Collective over ``tp_group`` and ``pp_group`` (when they have more than one rank).

    Args:
        tp_sharded_sq: squared norm of this rank's TP-sharded gradients.
        replicated_sq: squared norm of its gradients replicated across TP.
        tp_group: tensor-parallel group, or None.
        pp_group: pipeline-parallel group, or None.
    """
    if tp_group is not None and tp_group.size > 1:
        tp_sharded_sq = float(tp_group.allreduce(np.array([tp_sharded_sq], np.float64), "sum")[0])
    total = tp_sharded_sq + replicated_sq
    if pp_group is not None and pp_group.size > 1:
        total = float(pp_group.allreduce(np.array([total], np.float64), "sum")[0])
    return total


def clip_coefficient(norm: float, max_norm: float) -> float:
    """What every gradient is multiplied by: ``min(1, max_norm / (norm + 1e-6))``."""
    return min(1.0, max_norm / (norm + 1e-6))
