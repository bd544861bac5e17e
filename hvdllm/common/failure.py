"""Whole-job failure: one rank's uncaught exception ends every rank, fast.

Without this, a rank that raises leaves its peers blocked in a collective
until some distant timeout, or Horovod reports a wall of "Horovod has been
shut down" errors on every other rank that hides the one that matters.

:func:`install_failure_handler` replaces ``sys.excepthook`` (and the thread
hook) so that an uncaught exception on any rank:

1. prints ``[hvdllm] rank N failed`` and the full traceback to stderr;
2. calls ``MPI_Abort`` on the world communicator, which makes the launcher
   (mpirun or horovodrun) kill every rank and exit non-zero.

Errors that are only *consequences* of another rank's failure (Horovod's
shutdown errors, hvdllm's own communication timeouts) wait a few seconds
before aborting, so the rank with the real error wins the race to report.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any

SECONDARY_MARKERS = ("has been shut down", "HorovodInternalError", "horovod_shutdown")


def is_secondary(exc: BaseException) -> bool:
    """True for errors that usually follow another rank's failure."""
    from .errors import CommTimeoutError

    if isinstance(exc, CommTimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in SECONDARY_MARKERS)


def report_and_abort(exc: BaseException, rank: int, world_size: int, comm: Any = None,
                     exit_code: int = 1, grace_sec: float = 5.0, show_traceback: bool = True) -> None:
    """Print ``exc`` for ``rank`` and end the whole job (never returns)."""
    if world_size > 1 and is_secondary(exc):
        time.sleep(grace_sec)
    if show_traceback:
        body = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    else:
        body = f"hvdllm: error: {exc}\n"
    sys.stderr.write(f"[hvdllm] rank {rank} of {world_size} failed; ending the job\n{body}")
    sys.stderr.flush()
    sys.stdout.flush()
    if world_size > 1 and comm is not None:
        comm.Abort(exit_code)
    raise SystemExit(exit_code)


def install_failure_handler(comm: Any, grace_sec: float = 5.0) -> None:
    """Make an uncaught exception on this rank end the whole job.

    Args:
        comm: the world mpi4py communicator (``MPI.COMM_WORLD``).
        grace_sec: delay before a secondary error aborts the job.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt) or size == 1:
            previous(exc_type, exc, tb)
            return
        if exc.__traceback__ is None:
            exc = exc.with_traceback(tb)
        report_and_abort(exc, rank, size, comm, grace_sec=grace_sec)

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        report_and_abort(args.exc_value, rank, size, comm if size > 1 else None,
                         grace_sec=grace_sec)

    sys.excepthook = hook
    threading.excepthook = thread_hook
