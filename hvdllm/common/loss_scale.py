"""Precision modes and the dynamic loss-scale state machine for fp16 training.

Framework-free: the state machine only sees a boolean per step, "did any
gradient overflow?", which the caller has already agreed across **all**
ranks of the job (a MAX over the world group).  Fed the same flags, every
rank holds the same scale and skips the same steps, so replicas never
drift apart.

Rules (config ``train.precision = "fp16"``):

* start at ``init_scale`` (2**16);
* an overflow skips the step and multiplies the scale by ``backoff_factor``
  (0.5), never going below ``min_scale``;
* after ``growth_interval`` (2000) clean steps in a row the scale is
  multiplied by ``growth_factor`` (2), never above ``max_scale``.

bf16 has fp32's exponent range and needs no loss scaling; fp32 needs none
either.  The config loader calls :func:`check_precision` on
``train.precision``; :class:`hvdllm.torch.precision.MixedPrecision` drives
the state machine.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a known ``train.precision``."""
    if name not in PRECISIONS:
        raise ConfigError(f"train.precision = {name!r} is not one of {', '.join(PRECISIONS)}")


class DynamicLossScale:
    """Loss scale that backs off on overflow and grows after clean steps.

    Args:
        init_scale: starting scale.
        growth_factor: multiplier after ``growth_interval`` clean steps (> 1).
        backoff_factor: multiplier after an overflow (in (0, 1)).
        growth_interval: clean steps in a row before the scale grows.
        min_scale: the scale never backs off below this.
        max_scale: the scale never grows above this.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 min_scale: float = 1.0, max_scale: float = 2.0**24):
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ConfigError(f"loss scale needs 0 < min_scale <= init_scale <= max_scale, got "
                              f"{min_scale}, {init_scale}, {max_scale}")
        if growth_factor <= 1:
            raise ConfigError(f"loss-scale growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ConfigError(f"loss-scale backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ConfigError(f"loss-scale growth_interval must be >= 1, got {growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.clean_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> bool:
        """Advance one optimizer step; return True if that step's update applies.

        Args:
            found_inf: True if any gradient on any rank held inf or nan
                (already agreed across every rank).
        """
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            self.skipped_steps += 1
            return False
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
