"""Global gradient-norm clipping over a dp x tp x pp layout.

The global norm is the norm of the whole model's gradient, each parameter
counted exactly once:

* a parameter whose attribute ``hvdllm_tp_sharded`` is True is one TP
  shard of a larger weight, so its squared norm is summed over the TP group;
* every other parameter is replicated on each TP rank and counted once
  (summing it over TP would count it tp times);
* pipeline stages hold different parameters, so squared norms are summed
  over the PP group;
* DP replicas hold identical, already averaged gradients, so nothing is
  summed over DP.

Every rank then holds the same norm and scales its gradients by the same
``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
does for one process.

How the engine uses it (``train.grad_clip > 0``): after the DP gradient
average (``GradientSync.wait()`` or a compressor's ``reduce_grads_``) and,
in fp16, after unscaling, call ``clip_grad_norm_(model.parameters(),
cfg.train.grad_clip, groups.tp, groups.pp)`` and then ``optimizer.step()``.
With ZeRO-1 use :meth:`hvdllm.torch.zero.ZeroAdamW.clip_grad_norm_`, which
applies the same rule to the gradient shards.  TP layers mark their
sharded weights with :data:`TP_SHARDED_ATTR`.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..common.comm import Group
from ..common.grad_update import (PP_DUPLICATE_ATTR, TP_SHARDED_ATTR,  # noqa: F401
                                  combine_squared_norms)



def global_grad_norm(parameters: Iterable[torch.nn.Parameter], tp_group: Group | None = None,
                     pp_group: Group | None = None) -> float:
    """L2 norm of the whole model's gradient over the layout (collective over tp and pp).

    Args:
        parameters: this rank's parameters; those without a gradient are skipped.
        tp_group: tensor-parallel group, or None.
        pp_group: pipeline-parallel group, or None.
    """
    sums = [0.0, 0.0]  # [tp-sharded, replicated]
    for p in parameters:
        if p.grad is not None and not getattr(p, PP_DUPLICATE_ATTR, False):
            sharded = bool(getattr(p, TP_SHARDED_ATTR, False))
            sums[0 if sharded else 1] += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(combine_squared_norms(sums[0], sums[1], tp_group, pp_group))


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    tp_group: Group | None = None, pp_group: Group | None = None) -> torch.Tensor:
    """Scale gradients in place so the global norm is at most ``max_norm``; return the norm.

    Collective over ``tp_group`` and ``pp_group``: every rank of the layout
    must call it at the same point of the step.

    Args:
        parameters: this rank's parameters.
        max_norm: largest allowed global L2 norm.
        tp_group: tensor-parallel group, or None.
        pp_group: pipeline-parallel group, or None.
    """
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, tp_group, pp_group)
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
    return torch.tensor(total)
