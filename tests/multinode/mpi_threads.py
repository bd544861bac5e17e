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
``Wait`` instead of polling.  Results across the two simulated hosts are
in docs/multinode.md ("Open problems").
"""
import os, sys, threading, time
import numpy as np
from mpi4py import MPI
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
bg = world.Dup()                                  # like Horovod's communicator
pair = world.Split(rank % 2, rank)                # ranks {0,2} and {1,3}: across the hosts
stop = threading.Event()
cycles = [0]
def background():
    x = np.zeros(1, np.int64); y = np.zeros(1, np.int64)
    while not stop.is_set():
        if os.environ.get("BGNB"):
            r = bg.Iallreduce(x, y, MPI.BAND)
            while not r.Test():
                time.sleep(1e-4)
        else:
            bg.Allreduce(x, y, MPI.BAND)              # blocking, every 5 ms (Horovod's cycle)
        cycles[0] += 1
        time.sleep(0.005)
    x[0] = 1
t = threading.Thread(target=background, daemon=True)
if not os.environ.get("NOBG"): t.start()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
buf = np.ones(int(sys.argv[2]) if len(sys.argv) > 2 else 450_000, np.float32)
t0 = time.time(); worst = 0.0
for i in range(n):
    s = time.time()
    req = pair.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)
    pause = 1e-6
    if os.environ.get("MAINWAIT"):
        req.Wait()
    while not req.Test():
        time.sleep(pause); pause = min(pause * 2, 1e-3)
        if time.time() - s > 60:
            print(f"rank {rank}: STALL at iteration {i} (bg cycles {cycles[0]})", flush=True); world.Abort(3)
    buf[:] = 1.0
    worst = max(worst, time.time() - s)
print(f"rank {rank}: {n} iterations in {time.time()-t0:.1f}s, worst {worst:.2f}s, bg cycles {cycles[0]}", flush=True)
stop.set()
