"""Each rank prints, as one JSON line, how MPI and Horovod see it across hosts.

Run under mpirun; the test compares the fields with the host each rank runs
on.  ``world_sum`` is a Horovod allreduce of the ranks over every host.

    horovod_view.py [horovod|hvdllm]

``horovod`` (the default): stock ``horovod.torch``, over MPI; ``hvdllm``:
the ``hvdllm.torch`` drop-in, whose ``init`` picks Horovod's transport
(Gloo across hosts, hvdllm.common.horovod_backend).
"""
import json
import os
import socket
import sys

import torch
from mpi4py import MPI

from hvdllm.common.launch import threads_per_rank

which = sys.argv[1] if len(sys.argv) > 1 else "horovod"
if which == "hvdllm":
    import hvdllm.torch as hvd
else:
    import horovod.torch as hvd

comm = MPI.COMM_WORLD
hvd.init(comm=comm)
total = hvd.allreduce(torch.tensor([float(hvd.rank())]), op=hvd.Sum, name="world_sum")
print(json.dumps({
    "rank": hvd.rank(), "host": socket.gethostname(),
    "size": hvd.size(), "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
    "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(),
    "threads": threads_per_rank(comm), "world_sum": float(total[0]),
    "controller": os.environ.get("HOROVOD_CONTROLLER", "mpi"),
}), flush=True)
hvd.shutdown()
