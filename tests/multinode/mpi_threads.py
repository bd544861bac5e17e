"""Two threads in MPI at once, as in every hvdllm run: does MPI keep going?

The pattern of a training step: a background thread in a *blocking*
``MPI_Allreduce`` every 5 ms on its own communicator (Horovod's coordination
cycle), while the main thread runs non-blocking allreduces on a pair of ranks
and polls them with ``Test`` (hvdllm's bounded waits).  Each rank prints its
iterations and the background cycles, or ``STALL`` (and aborts the job) when
one allreduce has not finished in 60 s.

    mpirun -np 4 python tests/multinode/mpi_threads.py [ITERATIONS] [FLOATS]

``NOBG=1``: no background thread; ``BGNB=1``: the background thread polls a
non-blocking allreduce instead; ``MAINWAIT=1``: the main thread blocks in
``Wait`` instead of polling.  Across the two simulated hosts it stalls when
Open MPI binds the ranks of both hosts to the same cores, and runs without
the binding (docs/multinode.md, "Core binding").
"""
import os, sys, threading, time
import numpy as np
from mpi4py import MPI

BG_POLLS = bool(os.environ.get("BGNB"))      # background thread polls instead of blocking
MAIN_BLOCKS = bool(os.environ.get("MAINWAIT"))
NO_BG = bool(os.environ.get("NOBG"))
LIMIT_SEC = 60

world = MPI.COMM_WORLD
rank = world.Get_rank()
bg = world.Dup()                                  # like Horovod's communicator
pair = world.Split(rank % 2, rank)                # ranks {0,2} and {1,3}: across the hosts
stop = threading.Event()
cycles = 0


def background() -> None:
    """Horovod's coordination cycle: an allreduce every 5 ms on its own communicator."""
    global cycles
    x, y = np.zeros(1, np.int64), np.zeros(1, np.int64)
    while not y[0]:                               # ends when every rank has agreed to stop
        x[0] = stop.is_set()
        if BG_POLLS:
            req = bg.Iallreduce(x, y, MPI.MIN)
            while not req.Test():
                time.sleep(1e-4)
        else:
            bg.Allreduce(x, y, MPI.MIN)
        cycles += 1
        time.sleep(0.005)


thread = threading.Thread(target=background)
if not NO_BG:
    thread.start()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
buf = np.ones(int(sys.argv[2]) if len(sys.argv) > 2 else 450_000, np.float32)
t0, worst = time.time(), 0.0
for i in range(n):
    start = time.time()
    req = pair.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)
    if MAIN_BLOCKS:
        req.Wait()
    pause = 1e-6
    while not req.Test():                         # hvdllm's bounded wait
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
        if time.time() - start > LIMIT_SEC:
            print(f"rank {rank}: STALL at iteration {i} (bg cycles {cycles})", flush=True)
            world.Abort(3)
    buf[:] = 1.0
    worst = max(worst, time.time() - start)
print(f"rank {rank}: {n} iterations in {time.time() - t0:.1f}s, worst {worst:.2f}s, "
      f"bg cycles {cycles}", flush=True)
stop.set()
if thread.is_alive():
    thread.join()                                 # before MPI finalizes
