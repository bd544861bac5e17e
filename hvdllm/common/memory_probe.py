"""Measure what a run's model takes in memory, per rank (``HVDLLM_MEMORY_REPORT``).

With ``HVDLLM_MEMORY_REPORT=DIR`` in the environment, ``hvdllm train``
notes each rank's memory just before it builds the model and its peak at
the end, and writes ``DIR/memory-rank-K.json``.  The planner's benchmark
compares the difference with the planner's predicted model memory.

Two measures:

* ``rss_peak_delta``: the resident high-water mark (``VmHWM``, reset to the
  current size by writing 5 to ``/proc/self/clear_refs`` at the start) less
  the resident size at the start.  Run with ``MALLOC_MMAP_THRESHOLD_=65536``
  so that large tensors are mapped and unmapped rather than kept by malloc,
  else freed memory still counts as resident.
* ``allocator_peak_delta`` (TensorFlow with ``TF_CPU_ALLOCATOR_USE_BFC=true``):
  the CPU allocator's own peak less its use at the start; exact tensor bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "HVDLLM_MEMORY_REPORT"


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024
    return 0.0


def _tf_memory() -> dict | None:
    try:
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("CPU:0")
    except Exception:  # noqa: BLE001 - no allocator statistics (not BFC): RSS only
        return None


class MemoryProbe:
    """Start before the model is built; :meth:`finish` after training."""

    def __init__(self, framework: str):
        self.framework = framework
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.rss0 = _status_kb("VmRSS")
        self.tf0 = None
        if framework == "tensorflow":
            info = _tf_memory()
            if info is not None:
                import tensorflow as tf

                tf.config.experimental.reset_memory_stats("CPU:0")
                self.tf0 = info["current"]

    def finish(self, rank: int, out_dir: str | os.PathLike) -> dict[str, Any]:
        report: dict[str, Any] = {"rank": rank, "framework": self.framework,
                                  "rss_start": self.rss0, "hwm_reset": self.hwm_reset,
                                  "rss_peak_delta": _status_kb("VmHWM") - self.rss0}
        if self.tf0 is not None:
            info = _tf_memory()
            if info is not None:
                report["allocator_peak_delta"] = info["peak"] - self.tf0
        path = Path(out_dir) / f"memory-rank-{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))
        return report


def start(framework: str) -> MemoryProbe | None:
    """A probe when ``HVDLLM_MEMORY_REPORT`` asks for one, else None."""
    return MemoryProbe(framework) if os.environ.get(ENV) else None
