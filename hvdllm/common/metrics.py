"""Run outputs: ``metrics.jsonl``, the resolved ``config.toml`` and a progress line.

Only the rank that owns the writer (rank 0) touches the files; other ranks
get a disabled writer so call sites need no ``if rank == 0``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class MetricsWriter:
    """Append one JSON object per logged step to ``<dir>/metrics.jsonl``.

    Args:
        out_dir: output directory, created if missing.
        enabled: False on every rank but rank 0.
    """

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.dir = Path(out_dir)
        self._fh: TextIO | None = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def open(self, keep_until: int | None = None) -> None:
        """Start ``metrics.jsonl``: afresh, or (resuming) keeping records up to ``keep_until``.

        A resumed run's file then reads as if the run had never stopped: the
        records the interrupted run wrote after its checkpoint are dropped.
        """
        if not self.enabled or self._fh is not None:
            return
        path = self.dir / "metrics.jsonl"
        kept: list[str] = []
        if keep_until is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by the crash, and everything after it
                if isinstance(record, dict) and record.get("step", 0) <= keep_until:
                    kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(tmp, path)
        self._fh = open(path, "a", encoding="utf-8")

    def write_config(self, toml_text: str) -> None:
        if self.enabled:
            (self.dir / "config.toml").write_text(toml_text, encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self.open()
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class ProgressBar:
    """A text progress bar with the latest metrics.

    On a terminal the line redraws in place; under a launcher (stdout is a
    pipe, as with mpirun) it prints one line per update so output stays
    readable when interleaved.
    """

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None, width: int = 24,
                 done: int = 0):
        self.total = total
        self.done = done  # steps finished before this process started (a resumed run)
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.width = width
        self.start = time.perf_counter()
        # Redraw in place only on a real terminal of a plain process: under a
        # launcher (mpirun, horovodrun) lines get prefixed and interleaved.
        launched = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_RANK"))
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)()) and not launched

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        frac = step / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"[{bar}] {step}/{self.total}"]
        for key, value in fields.items():
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        elapsed = time.perf_counter() - self.start
        ran = step - self.done
        eta = elapsed / ran * (self.total - step) if ran > 0 else 0.0
        parts.append(f"{elapsed:.0f}s<{eta:.0f}s")
        line = " | ".join(parts)
        if self._tty:
            end = "\n" if step >= self.total else ""
            self.stream.write("\r" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
