"""One side of a ``dp_overhead.py`` comparison, run as its own process (or MPI job).

Started by ``benchmarks/dp_overhead.py``; not meant to be run by hand::

    python benchmarks/dp_overhead_worker.py SIDE SETTINGS_JSON

Every rank builds its side (model, optimizer, engine or peer), runs the
untimed set-up steps, connects to the orchestrator's TCP address
(``HVDLLM_BENCH_ADDR``), says hello (naming its job, ``HVDLLM_BENCH_JOB``),
and then serves commands, one JSON object per line:

* ``{"cmd": "run", "op": NAME, "reps": K, "args": {...}}``: run operation
  ``NAME`` ``K`` times.  Multi-rank sides pass an MPI barrier before each
  repetition so that all ranks start together; each repetition is timed
  from the barrier to the end of the operation.  Replies with the list of
  this rank's times in seconds.
* ``{"cmd": "exit"}``: clean up and leave.

Sides are plain classes with a ``prepare(op, args)`` hook (untimed) and one
zero-argument callable per operation; they live in ``dp_overhead_torch.py``,
``dp_overhead_tf.py`` and below (the raw mpi4py peer).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

#: seconds a rank waits for the orchestrator's next command (it may be paused meanwhile)
COMMAND_WAIT_SEC = 1800.0


class MpiAllreduceSide:
    """Peer of the gradient sync: one raw ``MPI_Allreduce`` of a flat float32 buffer.

    The buffer holds as many float32 values as the model has parameters, so
    it moves the same bytes as hvdllm's gradient sync.  Send and receive
    buffers are allocated once, outside the timing.  ``allreduce`` is the
    textbook call with separate send and receive buffers (the peer of the
    targets); ``allreduce_inplace`` sums the buffer in its own memory
    (``MPI.IN_PLACE``), which is what hvdllm's syncs do and is faster on one
    node (shown by ``--diagnose``).
    """

    world = 2

    def __init__(self, settings: dict[str, Any]):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.send = self.recv = np.empty(0, np.float32)
        self.info = {"threads": None}
        self.ops = {"allreduce": self.allreduce, "allreduce_inplace": self.allreduce_inplace}

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        count = int(args["count"])
        if self.send.size != count:
            rng = np.random.default_rng(self.comm.Get_rank())
            self.send = rng.standard_normal(count).astype(np.float32)
            self.recv = np.empty_like(self.send)

    def allreduce(self) -> None:
        self.comm.Allreduce(self.send, self.recv, op=self.MPI.SUM)

    def allreduce_inplace(self) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, self.recv, op=self.MPI.SUM)

    def close(self) -> None:
        pass


def build_side(name: str, settings: dict[str, Any]) -> Any:
    """Construct side ``name``; framework modules are imported only when needed."""
    if name == "mpi_allreduce":
        return MpiAllreduceSide(settings)
    framework, _, kind = name.partition(".")
    if framework == "torch":
        import dp_overhead_torch as sides
    elif framework == "tensorflow":
        import dp_overhead_tf as sides
    else:
        raise ValueError(f"unknown side {name!r}")
    return sides.SIDES[kind](settings)


def _rank_and_size() -> tuple[int, int]:
    """Rank and world size as the launcher set them (no MPI needed)."""
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    return rank, size


def _barrier_for(size: int) -> Callable[[], None]:
    if size == 1:
        return lambda: None
    from mpi4py import MPI

    return MPI.COMM_WORLD.Barrier


def serve(side_name: str, settings: dict[str, Any]) -> int:
    rank, size = _rank_and_size()
    job = os.environ.get("HVDLLM_BENCH_JOB", side_name)
    hello: dict[str, Any] = {"hello": job, "rank": rank, "pid": os.getpid()}
    try:
        side = build_side(side_name, settings)
        barrier = _barrier_for(size)
        hello["info"] = side.info
    except Exception:
        hello["error"] = traceback.format_exc()
    # Connect only once set up: the orchestrator pauses a job when all its ranks said hello.
    host, port = os.environ["HVDLLM_BENCH_ADDR"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60.0)
    stream = sock.makefile("rw", encoding="utf-8", newline="\n")

    def send(obj: dict[str, Any]) -> None:
        stream.write(json.dumps(obj) + "\n")
        stream.flush()

    send(hello)
    if "error" in hello:
        return 1
    sock.settimeout(COMMAND_WAIT_SEC)
    status = 0
    while True:
        line = stream.readline()
        if not line:  # the orchestrator went away
            status = 1
            break
        msg = json.loads(line)
        if msg["cmd"] == "exit":
            break
        try:
            side.prepare(msg["op"], msg.get("args", {}))
            op = side.ops[msg["op"]]
            times = []
            for _ in range(int(msg["reps"])):
                barrier()
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
            send({"times": times})
        except Exception:
            send({"error": traceback.format_exc()})
            status = 1
            break
    side.close()
    sock.close()
    return status


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], json.loads(sys.argv[2])))
