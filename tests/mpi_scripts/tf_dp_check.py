"""Run under mpirun -np 2: the TensorFlow DP engine's communication pattern.

The accumulation graph (with its loop over micro-batches) must hold no
Horovod op, the DP reduce graph exactly one allreduce (all gradients in one
flat buffer) at its top level, and the optimizer's graph none; the
parameters must stay identical across ranks after steps on different data.
"""
import numpy as np
from mpi4py import MPI

from hvdllm.common.config import build_config
from hvdllm.common.topology import Topology
from hvdllm.tensorflow import engine as engine_mod
from hvdllm.tensorflow.distributed import init_groups

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
cfg = build_config({}, [f"parallel.dp={size}", "train.framework=tensorflow",
                        "train.global_batch_size=8", f"train.micro_batch_size={8 // (2 * size)}"])
groups = init_groups(Topology(size), comm, 60.0)
eng = engine_mod.build_engine(cfg, groups, threads=1)
accum = cfg.grad_accum_steps
assert accum == 2, accum
rng = np.random.default_rng(rank)
micro = [(rng.integers(0, 256, (cfg.train.micro_batch_size, 64)),
          rng.integers(0, 256, (cfg.train.micro_batch_size, 64))) for _ in range(accum)]
for _ in range(3):
    eng.train_step(micro, lr=1e-3)
assert len(eng._traced) == 1, "the step was traced more than once"
accumulate_def = next(iter(eng._traced.values())).graph.as_graph_def()
sync_def = eng.update._allreduce.concrete.graph.as_graph_def()
apply_def = eng.update._step.concrete.graph.as_graph_def()


def horovod_ops(nodes):
    return [n.op for n in nodes if n.op.startswith("Horovod")]


def inner_ops(graph_def):
    return [op for fn in graph_def.library.function for op in horovod_ops(fn.node_def)]


# Accumulation (with its loop over micro-batches) communicates nothing; the
# reduce graph holds exactly one allreduce, at its top level; applying none.
assert horovod_ops(accumulate_def.node) == [] and inner_ops(accumulate_def) == []
assert horovod_ops(apply_def.node) == [] and inner_ops(apply_def) == []
assert horovod_ops(sync_def.node) == ["HorovodAllreduce"], horovod_ops(sync_def.node)
assert inner_ops(sync_def) == [], inner_ops(sync_def)
checksums = comm.allgather(float(sum(np.sum(v.numpy(), dtype=np.float64) for v in eng.variables)))
assert len(set(checksums)) == 1, checksums
print(f"rank {rank}: tensorflow dp checks passed", flush=True)
