"""Mixed precision for torch: bf16 or fp16 autocast over fp32 master weights.

The model's parameters stay fp32 and are the master weights: the optimizer
updates them in fp32.  Inside :meth:`MixedPrecision.autocast` the forward
runs matrix products in the low-precision type, and the gradients that
reach the fp32 parameters are fp32.

* ``bf16``: ``torch.autocast(device, dtype=torch.bfloat16)``; bf16 has
  fp32's exponent range, so no loss scaling.
* ``fp16``: ``torch.autocast(device, dtype=torch.float16)`` with dynamic
  loss scaling (:class:`hvdllm.common.loss_scale.DynamicLossScale`).  The
  loss is multiplied by the scale before backward; afterwards
  :meth:`MixedPrecision.unscale_` looks for inf/nan in this rank's
  gradients and takes the MAX of that flag over the **world** group, so
  every rank (every dp, tp and pp coordinate) skips the same steps and
  keeps the same scale.
* ``fp32``: autocast off, nothing to do.

:func:`check_fp16_supported` runs a tiny fp16 autocast forward and backward
on the device and raises a clear error if this torch build cannot do it.
torch 2.13 on CPU can; older CPU builds could not.

How the engine uses it (``train.precision``)::

    mp = MixedPrecision(cfg.train.precision, groups.world, device_type="cpu")
    # per micro-batch
    with mp.autocast():
        loss = model.loss(x, y)
    mp.scale_loss(loss / n_micro).backward()
    # after the DP gradient average
    found_inf = mp.unscale_(model.parameters())     # collective over the world
    if not found_inf:
        clip_grad_norm_(...); optimizer.step()
    mp.update(found_inf)
"""
from __future__ import annotations

import contextlib
import functools
from typing import ContextManager, Iterable

import numpy as np
import torch

from ..common.comm import Group
from ..common.errors import EnvironmentSetupError
from ..common.loss_scale import DynamicLossScale, check_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def _fp16_problem(device_type: str) -> str | None:
    """Why fp16 autocast cannot train on ``device_type``, or None if it can."""
    if not torch.amp.is_autocast_available(device_type):
        return "no autocast on this device"
    try:
        layer = torch.nn.Linear(4, 4).to(device_type)
        with torch.autocast(device_type, dtype=torch.float16):
            out = layer(torch.ones(2, 4, device=device_type))
        out.float().sum().backward()
    except Exception as exc:  # a capability probe: any failure means "unsupported"
        return str(exc).splitlines()[0] or type(exc).__name__
    if out.dtype != torch.float16:
        return f"autocast produced {out.dtype}"
    if not bool(torch.isfinite(layer.weight.grad).all()):
        return "non-finite gradients"
    return None


def check_fp16_supported(device_type: str = "cpu") -> None:
    """Raise :class:`EnvironmentSetupError` unless fp16 autocast trains on ``device_type``.

    Runs (once per device type) a tiny Linear forward and backward under
    fp16 autocast: the output must be float16 and the gradient finite.

    Args:
        device_type: "cpu" or "cuda".
    """
    problem = _fp16_problem(device_type)
    if problem is not None:
        raise EnvironmentSetupError(
            f"train.precision = \"fp16\" is not supported on {device_type} by torch "
            f"{torch.__version__} ({problem}); use train.precision = \"bf16\" or \"fp32\"")


class MixedPrecision:
    """Autocast and (for fp16) dynamic loss scaling agreed over the world.

    Args:
        precision: "fp32", "bf16" or "fp16" (``train.precision``).
        world: the world group (every rank of the job); None in a
            single-process run.
        device_type: "cpu" or "cuda".
        loss_scale: fp16 loss-scale state; defaults to
            ``DynamicLossScale()`` (2**16, x2 every 2000 clean steps, x0.5
            on overflow).
    """

    def __init__(self, precision: str, world: Group | None, device_type: str = "cpu",
                 loss_scale: DynamicLossScale | None = None):
        check_precision(precision)
        if precision == "fp16":
            check_fp16_supported(device_type)
        self.precision = precision
        self.world = world
        self.device_type = device_type
        self.loss_scale = (loss_scale or DynamicLossScale()) if precision == "fp16" else None

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 unless fp16)."""
        return self.loss_scale.scale if self.loss_scale is not None else 1.0

    def autocast(self) -> ContextManager:
        """Context for the forward pass (and loss): autocast in bf16/fp16, nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AUTOCAST_DTYPES[self.precision])

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (fp16), else ``loss`` unchanged."""
        return loss * self.loss_scale.scale if self.loss_scale is not None else loss

    def unscale_(self, parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Check gradients for inf/nan on every rank; unscale them if all are finite.

        Collective over the world group in fp16 (a MAX of one flag); free
        otherwise.  Returns True if some rank found inf or nan, in which
        case the caller must skip ``optimizer.step()`` (the gradients are
        left as they are).

        Args:
            parameters: this rank's parameters.
        """
        if self.loss_scale is None:
            return False
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = [torch.isfinite(g).all() for g in grads]
        local = bool(grads) and not bool(torch.stack(finite).all())
        found_inf = local
        if self.world is not None and self.world.size > 1:
            flag = self.world.allreduce(np.array([int(local)], np.int32), "max")
            found_inf = bool(flag[0])
        if not found_inf:
            inv = 1.0 / self.loss_scale.scale
            with torch.no_grad():
                for g in grads:
                    g.mul_(inv)
        return found_inf

    def update(self, found_inf: bool) -> bool:
        """Advance the loss scale after a step; returns True if the step was applied.

        Args:
            found_inf: the agreed flag :meth:`unscale_` returned.
        """
        if self.loss_scale is None:
            return True
        return self.loss_scale.update(found_inf)
