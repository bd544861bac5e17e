"""ZeRO stage 1: AdamW whose state is sharded over the data-parallel group.

Every rank keeps the full model (parameters and gradients) but only its
``1/dp`` shard of the optimizer: fp32 master weights and the two Adam
moments of the elements in its shard of the flat layout
(:mod:`hvdllm.common.zero`).  One step:

1. the local gradients are copied into a flat fp32 buffer (padded to a
   multiple of dp) and **reduce-scattered** (average) over the DP process
   set, so each rank receives the averaged gradient of its shard only;
2. (optionally) :meth:`ZeroAdamW.clip_grad_norm_` scales the shard by the
   global gradient norm;
3. AdamW updates the master shard, with the math of
   ``torch.optim.AdamW`` (decoupled weight decay, bias correction;
   ``torch.optim.Adam``'s L2 decay when built from an Adam);
4. the updated shards are **allgathered** and copied into the parameters.

The same bytes travel as in a plain allreduce (a reduce-scatter plus an
allgather), but optimizer memory per rank falls to about ``1/dp``.

How the engine uses it (``train.zero = 1``): build the usual AdamW with
:func:`hvdllm.torch.engine.build_optimizer`, then
``optimizer = zero_optimizer_from(optimizer, groups.dp, hvd)``; do not
attach :class:`~hvdllm.torch.data_parallel.GradientSync` (this optimizer
averages the gradients itself).  Per step: backward on every micro-batch,
then optionally ``optimizer.clip_grad_norm_(max_norm, groups.tp,
groups.pp)``, then ``optimizer.step()``.  Setting ``group["lr"]`` on
``optimizer.param_groups`` works as with any torch optimizer.  A
parameter without a gradient is updated as if its gradient were zero
(``torch.optim.AdamW`` would skip it).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from ..common.comm import Group
from ..common.errors import ConfigError
from ..common.watchdog import wait_horovod
from ..common.zero import build_flat_layout, check_zero_optimizer
from .clip import PP_DUPLICATE_ATTR, TP_SHARDED_ATTR, combine_squared_norms

__all__ = ["ZeroAdamW", "zero_optimizer_from", "check_zero_optimizer"]


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW with master weights and moments sharded over ``group``.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``;
            identical (same shapes, same order) on every rank of ``group``.
        group: the data-parallel group; its ``process_set`` carries the traffic.
        hvd: the ``horovod.torch`` module (unused when the group has one rank).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; groups may
            override each.
        decoupled_weight_decay: True for AdamW, False for Adam's L2 penalty.
    """

    def __init__(self, params: Iterable[Any], group: Group, hvd: Any, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, decoupled_weight_decay: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        self.group = group
        self.hvd = hvd
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.layout = build_flat_layout([p.numel() for p in self._params], group.size)
        self._shard_start, self._shard_end = self.layout.shard_range(group.rank)
        # Flat [start, end) of each parameter group (groups are laid out in order).
        self._group_ranges = []
        at = 0
        for g in self.param_groups:
            n = sum(p.numel() for p in g["params"])
            self._group_ranges.append((at, at + n))
            at += n
        self._flat_grad = torch.zeros(self.layout.padded, dtype=torch.float32)
        with torch.no_grad():
            self.master = self._flat_params()[self._shard_start:self._shard_end].clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.steps = 0
        self._grad_shard: torch.Tensor | None = None

    # -- flat buffers ------------------------------------------------------
    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters in flat-layout order (:attr:`layout` indexes them)."""
        return self._params

    @property
    def shard_range(self) -> tuple[int, int]:
        """``[start, end)`` of this rank's shard in the flat buffer."""
        return self._shard_start, self._shard_end

    def flat_params(self) -> torch.Tensor:
        """Every parameter laid end to end (fp32, padded), as the layout places them."""
        return self._flat_params()

    def _flat_params(self) -> torch.Tensor:
        flat = torch.zeros(self.layout.padded, dtype=torch.float32)
        for p, offset in zip(self._params, self.layout.offsets):
            flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        return flat

    def reduce_gradients(self) -> torch.Tensor:
        """Reduce-scatter (average) the gradients; returns this rank's fp32 gradient shard.

        Called by :meth:`step` if not called before it in the same step.
        """
        if self._grad_shard is not None:
            return self._grad_shard
        flat = self._flat_grad
        for p, offset in zip(self._params, self.layout.offsets):
            view = flat[offset:offset + p.numel()]
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1))
        if self.group.size == 1:
            shard = flat.clone()
        else:
            handle = self.hvd.reducescatter_async(flat, op=self.hvd.Average,
                                                  name="hvdllm.zero.grads",
                                                  process_set=self.group.process_set)
            shard = wait_horovod(self.hvd, handle, "ZeRO-1 reduce-scatter of gradients",
                                 self.group, flat.numel() * flat.element_size())
        self._grad_shard = shard
        return shard

    def clip_grad_norm_(self, max_norm: float, tp_group: Group | None = None,
                        pp_group: Group | None = None) -> float:
        """Scale the averaged gradient shard so the global norm is at most ``max_norm``.

        The norm counts every parameter once over dp x tp x pp, as
        :func:`hvdllm.torch.clip.clip_grad_norm_` does; returns it.

        Args:
            max_norm: largest allowed global L2 norm.
            tp_group: tensor-parallel group (parameters marked
                ``hvdllm_tp_sharded`` are summed over it).
            pp_group: pipeline-parallel group.
        """
        shard = self.reduce_gradients()
        sums = [0.0, 0.0]  # [tp-sharded, replicated]
        for piece in self.layout.shard_slices(self.group.rank):
            if getattr(self._params[piece.index], PP_DUPLICATE_ATTR, False):
                continue
            sharded = bool(getattr(self._params[piece.index], TP_SHARDED_ATTR, False))
            values = shard[piece.shard_start:piece.shard_start + piece.numel]
            sums[0 if sharded else 1] += float(values.double().pow(2).sum())
        if self.group.size > 1:
            sums = [float(x) for x in self.group.allreduce(np.array(sums, np.float64), "sum")]
        total = math.sqrt(combine_squared_norms(sums[0], sums[1], tp_group, pp_group))
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            shard.mul_(coef)
        return total

    # -- the step ----------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Reduce-scatter gradients (unless done), update the shard, allgather parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad = self.reduce_gradients()
        self._grad_shard = None
        self.steps += 1
        for g, (start, end) in zip(self.param_groups, self._group_ranges):
            lo, hi = self.layout.local_range(start, end, self.group.rank)
            if lo < hi:
                self._adamw(g, self.master[lo:hi], grad[lo:hi], self.exp_avg[lo:hi],
                            self.exp_avg_sq[lo:hi])
        self._gather_params()
        return loss

    def _adamw(self, g: dict, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor) -> None:
        lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        if wd != 0:
            if g["decoupled_weight_decay"]:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** self.steps)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** self.steps)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _gather_params(self) -> None:
        if self.group.size == 1:
            flat = self.master
        else:
            handle = self.hvd.allgather_async(self.master, name="hvdllm.zero.params",
                                              process_set=self.group.process_set)
            flat = wait_horovod(self.hvd, handle, "ZeRO-1 allgather of parameters", self.group,
                                self.master.numel() * self.master.element_size())
        for p, offset in zip(self._params, self.layout.offsets):
            p.copy_(flat[offset:offset + p.numel()].view_as(p))

    # -- accounting and checkpoints -----------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 master shard and both moments."""
        return sum(t.numel() * t.element_size() for t in (self.master, self.exp_avg,
                                                          self.exp_avg_sq))

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state (a checkpoint holds one per DP rank)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "steps": self.steps, "dp": self.group.size,
                "dp_rank": self.group.rank, "numel": self.layout.total,
                "master": self.master.clone(), "exp_avg": self.exp_avg.clone(),
                "exp_avg_sq": self.exp_avg_sq.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a shard saved by :meth:`state_dict` at the same dp, rank and model size."""
        have = (self.group.size, self.group.rank, self.layout.total)
        saved = (state["dp"], state["dp_rank"], state["numel"])
        if have != saved:
            raise ConfigError(f"ZeRO-1 state was saved for (dp, dp rank, parameters) = {saved} "
                              f"but this rank has {have}")
        for g, saved_g in zip(self.param_groups, state["param_groups"]):
            g.update(saved_g)
        self.steps = int(state["steps"])
        for name in ("master", "exp_avg", "exp_avg_sq"):
            getattr(self, name).copy_(state[name])
        with torch.no_grad():
            self._gather_params()


def zero_optimizer_from(optimizer: torch.optim.Optimizer, group: Group, hvd: Any) -> ZeroAdamW:
    """A :class:`ZeroAdamW` with ``optimizer``'s parameter groups and hyper-parameters.

    Args:
        optimizer: a fresh ``torch.optim.AdamW`` or ``torch.optim.Adam``
            (no steps taken yet); anything else is a :class:`ConfigError`.
        group: the data-parallel group.
        hvd: the ``horovod.torch`` module.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(f"ZeRO-1 shards the state of torch.optim.AdamW and torch.optim.Adam "
                          f"only, not {type(optimizer).__name__}")
    for g in optimizer.param_groups:
        for flag in ("amsgrad", "maximize"):
            if g.get(flag):
                raise ConfigError(f"ZeRO-1 does not support "
                                  f"{type(optimizer).__name__}({flag}=True)")
        if any(isinstance(v, torch.Tensor) for v in (g["lr"], *g["betas"])):
            raise ConfigError("ZeRO-1 needs float lr and betas, not tensors")
    if optimizer.state:
        raise ConfigError("ZeRO-1 must wrap an optimizer before its first step (its state "
                          "would be lost)")
    groups = [{"params": list(g["params"]), "lr": g["lr"], "betas": tuple(g["betas"]),
               "eps": g["eps"], "weight_decay": g["weight_decay"],
               "decoupled_weight_decay": bool(g.get("decoupled_weight_decay", False))}
              for g in optimizer.param_groups]
    return ZeroAdamW(groups, group, hvd)
