"""A simulated slow data-parallel link, for benchmarks (off unless asked for).

On one machine the ranks' "wire" is shared memory, so gradient compression
rarely pays in wall time there.  To see where it would pay on a slower
network, set the environment variable ``HVDLLM_SIM_LINK_GBPS`` to a link
speed in gigabits per second (``HVDLLM_SIM_LINK_GBPS=1`` for 1 Gb/s) for
every rank, e.g. ``mpirun -x HVDLLM_SIM_LINK_GBPS=1 ...`` or in the
launching shell.  Unset (or empty) means off: the engine's two calls,
:func:`clock` and :func:`settle`, return at once.  A value that is not a
positive number stops the run with a one-line error.

Model
-----
Each optimizer step's data-parallel gradient exchange is made to take at
least ``bytes / bandwidth``, where ``bytes`` is what the engine already
logs as ``comm_bytes`` (the bytes one rank sends under bandwidth-optimal
ring algorithms, :func:`hvdllm.common.compression.wire_bytes`; a
compressor's ``last_step_bytes``).  After the real exchange returns, the
rank sleeps for whatever remains of that time.  So a link of ``B`` Gb/s
costs a step ``max(0, 8 bytes / (B 1e9) - real)`` seconds more.

Limits
------
* Only the bandwidth term: no latency per message, no congestion, no
  slower partial-sum arithmetic.  Compressors that send many small
  messages (per-tensor PowerSGD factors, top-k allgathers) would pay more
  latency on a real network than here.
* The clock starts when the engine waits for the exchange (torch:
  ``GradientSync.wait()``, after backward), so the simulated transfer is
  never hidden behind backward, even though the "none" path starts its
  bucket allreduces inside backward.  On hardware with a spare core per
  rank that overlap would cut the cost of "none"; this model charges it
  in full, which favours the compressors.
* ZeRO-1 (``train.zero = 1``) exchanges in its optimizer step and is not
  throttled; nor are the tensor- and pipeline-parallel exchanges.  The
  calls sit where the engine reduces gradients (``reduce_gradients`` /
  ``reduce``) and, for a compressor that exchanges inside the optimizer
  step (``train.compression_target = "momentum"``), around that step, so
  its clock also counts the step's own arithmetic.
* All ranks sleep the same modelled time (the bytes are the same on
  every rank), so the throttle adds no imbalance of its own.
"""
from __future__ import annotations

import os
import time

from .errors import ConfigError

#: Environment variable holding the simulated link speed in Gb/s.
ENV_VAR = "HVDLLM_SIM_LINK_GBPS"


def parse_gbps(value: str | None) -> float | None:
    """The link speed in Gb/s from the variable's text: None when unset or empty.

    Raises:
        ConfigError: when the text is not a finite number > 0.
    """
    if value is None or not value.strip():
        return None
    try:
        gbps = float(value)
    except ValueError:
        gbps = float("nan")
    if not 0.0 < gbps < float("inf"):
        raise ConfigError(f"{ENV_VAR} must be a link speed in Gb/s > 0 (e.g. 1 or 0.5), "
                          f"got {value!r}")
    return gbps


class LinkThrottle:
    """Makes each DP gradient exchange last at least ``bytes / bandwidth``.

    Args:
        gbps: link speed in gigabits per second; None: off.
        sleep: the sleep function (tests pass a recorder).
        now: the clock in seconds (tests pass a fake one).
    """

    def __init__(self, gbps: float | None, sleep=time.sleep, now=time.perf_counter):
        self.gbps = gbps
        self.bytes_per_sec = None if gbps is None else gbps * 1e9 / 8
        self._sleep = sleep
        self._now = now

    @property
    def enabled(self) -> bool:
        """Whether a link speed is set."""
        return self.bytes_per_sec is not None

    def clock(self) -> float:
        """Time the exchange starts (0.0 when off, without reading a clock)."""
        return self._now() if self.bytes_per_sec is not None else 0.0

    def settle(self, start: float, nbytes: int) -> float:
        """Sleep until ``nbytes`` would have crossed the link since ``start``.

        Returns:
            Seconds slept (0.0 when off or when the real exchange was slower).
        """
        if self.bytes_per_sec is None or nbytes <= 0:
            return 0.0
        remaining = nbytes / self.bytes_per_sec - (self._now() - start)
        if remaining <= 0:
            return 0.0
        self._sleep(remaining)
        return remaining


_current: LinkThrottle | None = None


def current() -> LinkThrottle:
    """This process's throttle, from :data:`ENV_VAR` at first use."""
    global _current
    if _current is None:
        try:
            gbps = parse_gbps(os.environ.get(ENV_VAR))
        except ConfigError as exc:
            # Every rank reads the same variable (the launcher passes it to
            # all) and fails at the same step, so no rank needs telling.
            exc.agreed = True  # type: ignore[attr-defined]
            raise
        _current = LinkThrottle(gbps)
    return _current


def reset() -> None:
    """Forget the throttle so the next use reads :data:`ENV_VAR` again (tests)."""
    global _current
    _current = None


def clock() -> float:
    """Start of a DP gradient exchange (see :meth:`LinkThrottle.clock`)."""
    return current().clock()


def settle(start: float, nbytes: int) -> float:
    """End of a DP gradient exchange of ``nbytes`` (see :meth:`LinkThrottle.settle`)."""
    return current().settle(start, nbytes)
