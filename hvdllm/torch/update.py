"""From this rank's gradients to an applied optimizer step.

:class:`GradientUpdate` owns everything between ``loss`` and the new
weights that does not depend on how the forward pass is laid out (one
model, or one pipeline stage):

1. ``autocast()`` and ``backward(loss, last)``: mixed precision
   (``train.precision``) with loss scaling for fp16; on the last
   micro-batch the overlapped data-parallel allreduces are armed.
2. ``reduce_gradients()``: the data-parallel average, by one of
   * :class:`~hvdllm.torch.data_parallel.GradientSync` (``compression =
     "none"``): bucketed allreduces that started inside backward;
   * a compressor (``fp16``, ``bf16``, ``topk``, ``powersgd``,
     :mod:`hvdllm.torch.compression`) run after backward;
   * nothing here for ZeRO-1 (``train.zero = 1``): its optimizer
     reduce-scatters the gradients itself.
3. ``apply()``: unscale and check for overflow (the flag agreed by all
   ranks, so everyone skips the same steps), clip the global norm over
   dp x tp x pp (``train.grad_clip``), step, update the loss scale.

Between 2 and 3 the engine runs reductions of its own layout (sequence-
parallel norms over TP, tied embeddings over PP).
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from ..common import link_throttle
from ..common.compression import wire_bytes
from ..common.config import Config
from ..common.grad_update import StepInfo
from ..common.topology import ParallelGroups
from .clip import clip_grad_norm_
from .compression import make_compressor
from .data_parallel import GradientSync
from .precision import MixedPrecision
from .zero import ZeroAdamW, zero_optimizer_from


class GradientUpdate:
    """Mixed precision, DP gradient averaging, clipping and the optimizer step.

    Args:
        model: this rank's (possibly sharded) module.
        optimizer: a plain optimizer over ``model``'s parameters; wrapped
            into ZeRO-1 when ``train.zero = 1``.
        cfg: the run's config.
        groups: this rank's groups.
        hvd: the ``horovod.torch`` module.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                 groups: ParallelGroups, hvd: Any):
        t = cfg.train
        self.model = model
        self.groups = groups
        self.grad_clip = t.grad_clip
        self.precision = MixedPrecision(t.precision, groups.world)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sync: GradientSync | None = None
        self.compressor = None
        if t.zero:
            self.optimizer = zero_optimizer_from(optimizer, groups.dp, hvd)
        else:
            self.optimizer = optimizer
            if t.compression == "none":
                self.sync = GradientSync(self.named_params, groups.dp, hvd, op=t.reduce_op)
            else:
                self.compressor = make_compressor(t.compression, groups.dp, hvd,
                                                  topk_ratio=t.topk_ratio,
                                                  powersgd_rank=t.powersgd_rank, seed=t.seed,
                                                  warmup_steps=t.compression_warmup_steps,
                                                  target=t.compression_target)
        # ZeRO's reduce-scatter plus allgather move what one allreduce moves.
        self._dense_bytes = sum(wire_bytes("none", p.shape, groups.dp.size)
                                for _, p in self.named_params)

    # -- backward ----------------------------------------------------------
    def autocast(self) -> ContextManager:
        """Context for forward passes and the loss."""
        return self.precision.autocast()

    def last_backward(self) -> ContextManager:
        """Context for the backward passes of the last micro-batch: DP allreduces start there."""
        return self.sync.sync() if self.sync is not None else contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the fp16 loss scale, and times 1/dp when the DP sync sums.

        :class:`GradientSync` reduces with a ``Sum``; scaling the loss (a
        single number) here turns that sum into the average at no cost.
        """
        loss = self.precision.scale_loss(loss)
        if self.sync is not None and self.sync.loss_factor != 1.0:
            loss = loss * self.sync.loss_factor
        return loss

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Back-propagate ``loss`` (already divided by the number of micro-batches)."""
        scaled = self.scale_loss(loss)
        if last:
            with self.last_backward():
                scaled.backward()
        else:
            scaled.backward()

    # -- after backward ----------------------------------------------------
    def reduce_gradients(self) -> None:
        """Average gradients over the DP group (ZeRO-1 defers this to its step)."""
        start = link_throttle.clock()  # HVDLLM_SIM_LINK_GBPS: a simulated slow link
        if self.sync is not None:
            self.sync.wait()
            link_throttle.settle(start, self._dense_bytes)
        elif self.compressor is not None:
            self.compressor.reduce_grads_(self.named_params)
            link_throttle.settle(start, self.compressor.last_step_bytes)

    def apply(self, lr: float) -> StepInfo:
        """Unscale, check overflow on all ranks, clip, step and update the loss scale."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for _, p in self.named_params]
        found_inf = self.precision.unscale_(params)
        info = StepInfo(applied=not found_inf)
        if not found_inf:
            if self.grad_clip > 0:
                if isinstance(self.optimizer, ZeroAdamW):  # ZeRO-1: on the shards
                    norm = self.optimizer.clip_grad_norm_(self.grad_clip, self.groups.tp,
                                                          self.groups.pp)
                else:
                    norm = clip_grad_norm_(params, self.grad_clip, self.groups.tp,
                                           self.groups.pp)
                info.grad_norm = float(norm)
            if getattr(self.compressor, "takes_step", False):  # compressed AdamW momentum
                start = link_throttle.clock()  # its exchange happens here, not in reduce
                self.compressor.step_(self.optimizer, self.named_params)
                link_throttle.settle(start, self.compressor.last_step_bytes)
            else:
                self.optimizer.step()
        if found_inf and self.compressor is not None:
            self.compressor.forget_nonfinite()  # the overflow must not live on in its state
        self.precision.update(found_inf)
        if self.precision.loss_scale is not None:
            info.loss_scale = self.precision.scale
        info.comm_bytes = (self.compressor.last_step_bytes if self.compressor is not None
                           else self._dense_bytes)
        return info

    def zero_grad(self) -> None:
        """Clear the gradients: zero the DP buckets they live in, else drop them."""
        if self.sync is not None and self.sync.buckets:
            self.sync.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
