"""Run outputs: ``metrics.jsonl``, TensorBoard events, the resolved ``config.toml``
and a progress bar.

Only the rank that owns the writer (rank 0) touches the files; other ranks
get a disabled writer so call sites need no ``if rank == 0``.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .errors import EnvironmentSetupError

# Record key -> TensorBoard tag.  Keys missing from a record, or not numbers,
# are skipped, so a validation record {"step", "val_loss"} adds val/loss only.
TENSORBOARD_TAGS: dict[str, str] = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "loss_scale": "train/loss_scale",
    "tokens_per_sec": "perf/tokens_per_sec",
    "mfu": "perf/mfu",
    "comm_bytes": "comm/bytes",
}

TENSORBOARD_DIR = "tensorboard"

# Launchers whose ranks get their output prefixed and interleaved line by line.
LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_RANK")


class _ScalarEvents:
    """Scalars in a TensorBoard event file: TensorBoard's record format and protos.

    Written synchronously with TensorBoard's ``RecordWriter`` on a plain file:
    each log is on disk (in the OS) when ``flush`` returns, so a crash loses
    nothing already logged.  (TensorBoard's ``EventFileWriter`` would import
    all of TensorFlow for its file system layer, seconds per run; tensorboardX's
    ``flush`` does not wait for its queue.)  Files are named by the nanosecond
    they were opened, so TensorBoard, which reads a directory's files in name
    order, reads a resumed run's after the interrupted one's.  Resuming, the
    file starts with a session start at ``purge_step``: TensorBoard then hides
    the older files' events from that step on.
    """

    def __init__(self, logdir: str, purge_step: int | None):
        import socket

        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time_ns():020d}.{socket.gethostname()}"
        self.path = Path(logdir) / name
        self._records = RecordWriter(open(self.path, "wb"))
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start))
        self.flush()

    def _add(self, event) -> None:
        self._records.write(event.SerializeToString())

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        self._add(self._event_pb2.Event(wall_time=time.time(), step=global_step,
                                        summary=summary))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()


def _summary_writer_class():
    """The TensorBoard event writer, or a one-line error when TensorBoard is missing."""
    try:
        for module in ("tensorboard.compat.proto.event_pb2",
                       "tensorboard.summary.writer.record_writer"):
            importlib.import_module(module)
    except ImportError as exc:
        raise EnvironmentSetupError(
            f"TensorBoard logging needs the tensorboard package, which cannot be imported "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"run `make setup`") from None
    return _ScalarEvents


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsWriter:
    """Append one JSON object per logged step to ``<dir>/metrics.jsonl`` and
    write the same numbers as TensorBoard scalars under ``<dir>/tensorboard``.

    Args:
        out_dir: output directory, created if missing.
        enabled: False on every rank but rank 0.
        tensorboard: also write TensorBoard events (the default).
    """

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.dir = Path(out_dir)
        self._fh: TextIO | None = None
        self._tb = None
        self._tb_class = None
        if enabled:
            if tensorboard:  # fail before training starts, not at the first log
                self._tb_class = _summary_writer_class()
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def tensorboard_dir(self) -> Path:
        return self.dir / TENSORBOARD_DIR

    def open(self, keep_until: int | None = None) -> None:
        """Start ``metrics.jsonl``: afresh, or (resuming) keeping records up to ``keep_until``.

        A resumed run's file then reads as if the run had never stopped: the
        records the interrupted run wrote after its checkpoint are dropped.
        TensorBoard does the same: the new event file starts with a purge at
        step ``keep_until + 1``, which hides the interrupted run's later
        events; a fresh start removes the event files of an earlier run.
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
        if self._tb_class is not None:
            self._open_tensorboard(keep_until)

    def _open_tensorboard(self, keep_until: int | None) -> None:
        tb_dir = self.tensorboard_dir
        if keep_until is None and tb_dir.is_dir():
            for old in tb_dir.glob("events.out.tfevents.*"):
                if old.is_file():
                    old.unlink()
        self._tb = self._tb_class(str(tb_dir), None if keep_until is None else keep_until + 1)

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
        step = record.get("step")
        if self._tb is not None and _is_number(step):
            for key, tag in TENSORBOARD_TAGS.items():
                value = record.get(key)
                if _is_number(value):  # NaN and inf included: TensorBoard shows them
                    self._tb.add_scalar(tag, float(value), global_step=int(step))
            self._tb.flush()  # a crash then loses nothing already logged

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _format_fields(fields: dict[str, Any]) -> list[str]:
    return [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in fields.items() if value is not None]


class ProgressBar:
    """A progress bar with the latest metrics.

    On a terminal of a plain process it is a live tqdm bar.  Under a launcher
    (mpirun, horovodrun: their ranks' lines get prefixed and interleaved) or
    when stdout is not a terminal it prints one plain line per update::

        [####....................] 3/20 | loss 4.9383 | tok_s 12602 | 0s<4s

    (bar, step/total, the fields, elapsed < estimated time left).
    """

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None, width: int = 24,
                 done: int = 0):
        self.total = total
        self.done = done  # steps finished before this process started (a resumed run)
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.width = width
        self.start = time.perf_counter()
        launched = any(v in os.environ for v in LAUNCHER_ENV)
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)()) and not launched
        self._bar = None
        if enabled and self._tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, file=self.stream, unit="step",
                             dynamic_ncols=True, mininterval=0, leave=True)

    @property
    def live(self) -> bool:
        """True when updates redraw a live bar, False when each prints a line."""
        return self.enabled and self._tty

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._tty:
            if self._bar is None:
                return  # closed: the bar already shows the end
            self._bar.set_postfix_str(", ".join(_format_fields(fields)), refresh=False)
            self._bar.update(step - self._bar.n)
            if step >= self.total:
                self.close()
            return
        frac = min(step / self.total, 1.0) if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        ran = step - self.done
        eta = elapsed / ran * (self.total - step) if ran > 0 else 0.0
        parts = [f"[{bar}] {step}/{self.total}", *_format_fields(fields),
                 f"{elapsed:.0f}s<{max(eta, 0.0):.0f}s"]
        self.stream.write(" | ".join(parts) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a live bar (it stays on screen); nothing to do for plain lines."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
