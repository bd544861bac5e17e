"""Run under a launcher: the last rank raises while the others wait in a Horovod allreduce.

Usage: fail_one_rank.py FRAMEWORK.  The job must end quickly and non-zero,
showing the failing rank's traceback.
"""
import sys
import time

from mpi4py import MPI

from hvdllm.common.failure import install_failure_handler
from hvdllm.common.topology import Topology

framework = sys.argv[1]
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
install_failure_handler(comm)
if framework == "torch":
    import torch

    from hvdllm.torch.distributed import init_groups, import_horovod
    hvd = import_horovod()
    init_groups(Topology(size), comm, 600.0)
    wait = lambda: hvd.allreduce(torch.ones(1), name="never")  # noqa: E731
else:
    import tensorflow as tf

    from hvdllm.tensorflow.distributed import init_groups, import_horovod
    hvd = import_horovod()
    init_groups(Topology(size), comm, 600.0)
    wait = lambda: hvd.allreduce(tf.ones([1]), name="never")  # noqa: E731


def deliberately_broken_step():
    raise ValueError("deliberate failure on the last rank")


if rank == size - 1:
    time.sleep(1.0)
    print(f"raising at {time.time():.3f}", flush=True)
    deliberately_broken_step()
else:
    wait()
    time.sleep(600)
