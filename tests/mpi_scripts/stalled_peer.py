"""Run under mpirun: the last rank never joins an allreduce (it just sleeps).

Usage: stalled_peer.py FRAMEWORK TIMEOUT_SEC.  With hvdllm's deadlines,
Horovod's stall detector must turn the wait into an error that ends the job.
"""
import sys
import time

from mpi4py import MPI

from hvdllm.common.failure import install_failure_handler
from hvdllm.common.topology import Topology

framework, timeout = sys.argv[1], float(sys.argv[2])
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
install_failure_handler(comm)
if framework == "torch":
    import torch

    from hvdllm.torch.distributed import init_groups, import_horovod
    hvd = import_horovod()
    init_groups(Topology(size), comm, timeout)
    wait = lambda: hvd.allreduce(torch.ones(1), name="stalled.tensor")  # noqa: E731
else:
    import tensorflow as tf

    from hvdllm.tensorflow.distributed import init_groups, import_horovod
    hvd = import_horovod()
    init_groups(Topology(size), comm, timeout)
    wait = lambda: hvd.allreduce(tf.ones([1]), name="stalled.tensor")  # noqa: E731

if rank == size - 1:
    time.sleep(600)
else:
    print(f"waiting at {time.time():.3f}", flush=True)
    wait()
