"""Run under mpirun: Horovod process sets match the topology's groups.

Usage: horovod_groups_check.py FRAMEWORK DP TP PP.  Allreduces over each
group's Horovod process set must sum exactly that group's ranks.
"""
import sys

import numpy as np
from mpi4py import MPI

from hvdllm.common.topology import Topology

framework = sys.argv[1]
dp, tp, pp = (int(a) for a in sys.argv[2:5])
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
topo = Topology(dp, tp, pp)

if framework == "torch":
    import torch

    from hvdllm.torch.distributed import import_horovod, init_groups
    hvd = import_horovod()
    groups = init_groups(topo, comm, 30.0)

    def hvd_sum(value, group):
        t = torch.tensor([float(value)])
        return float(hvd.allreduce(t, op=hvd.Sum, process_set=group.process_set,
                                   name=f"check.{group.kind}")[0])

    def hvd_broadcast_from(group, root):
        from hvdllm.torch.data_parallel import broadcast_module
        layer = torch.nn.Linear(2, 2)
        with torch.no_grad():
            layer.weight.fill_(rank)
        broadcast_module(layer, group, hvd, root=root)
        return float(layer.weight[0, 0])
else:
    import tensorflow as tf

    from hvdllm.tensorflow.distributed import import_horovod, init_groups
    hvd = import_horovod()
    groups = init_groups(topo, comm, 30.0)

    def hvd_sum(value, group):
        t = tf.constant([float(value)])
        return float(hvd.allreduce(t, op=hvd.Sum, process_set=group.process_set,
                                   name=f"check.{group.kind}").numpy()[0])

    def hvd_broadcast_from(group, root):
        from hvdllm.tensorflow.data_parallel import broadcast_variables
        var = tf.Variable(tf.fill([2, 2], float(rank)))
        broadcast_variables([var], group, hvd, root=root)
        return float(var.numpy()[0, 0])

for kind in ("dp", "tp", "pp"):
    g = getattr(groups, kind)
    if g.size == 1:
        assert g.process_set is None, (kind, g.process_set)
        continue
    assert g.process_set is not None, kind
    got = hvd_sum(rank + 1, g)
    want = float(sum(r + 1 for r in g.ranks))
    assert got == want, (kind, g.ranks, got, want)
    # Broadcast from the group's last rank (a group rank, not a global one).
    got = hvd_broadcast_from(g, root=g.size - 1)
    assert got == g.ranks[-1], (kind, g.ranks, got)
assert np.isclose(hvd_sum(1, groups.world), comm.Get_size())
print(f"rank {rank}: horovod process sets ok", flush=True)
