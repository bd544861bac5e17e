"""Run under mpirun -np 2: the TensorFlow DP engine's communication pattern.

The accumulation graph (with its loop over micro-batches) must hold no
Horovod op and hand over one flat gradient buffer; each step must make
exactly one MPI allreduce on the DP communicator (in place, of every
gradient at once) and no Horovod allreduce; the optimizer's graph holds no
Horovod op; the parameters must stay identical across ranks after steps on
different data.
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


class CountingComm:
    """The DP communicator, counting its Allreduce calls and their sizes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        self.calls.append((sendbuf is MPI.IN_PLACE, len(recvbuf[0]) // 4))
        return self.inner.Allreduce(sendbuf, recvbuf, op=op)

    def __getattr__(self, name):
        return getattr(self.inner, name)


assert eng.update.in_place and eng._flat_grads
counting = groups.dp.comm = CountingComm(groups.dp.comm)
steps = 3
for _ in range(steps):
    eng.train_step(micro, lr=1e-3)
numel = sum(int(np.prod(v.shape)) for v in eng.variables)
assert counting.calls == [(True, numel)] * steps, (counting.calls, numel)
assert len(eng._traced) == 1, "the step was traced more than once"
accumulate = next(iter(eng._traced.values()))
assert [tuple(t.shape) for t in accumulate.outputs[1:]] == [(numel,)], accumulate.outputs
accumulate_def = accumulate.graph.as_graph_def()
assert eng.update._allreduce.concrete is None, "the Horovod reduce graph ran"
assert eng.update._step.concrete is None, "the step took per-variable gradients"
apply_def = eng.update._step_flat.concrete.graph.as_graph_def()  # it cuts the flat sum itself


def horovod_ops(nodes):
    return [n.op for n in nodes if n.op.startswith("Horovod")]


def inner_ops(graph_def):
    return [op for fn in graph_def.library.function for op in horovod_ops(fn.node_def)]


# Accumulation (with its loop over micro-batches) communicates nothing; the
# reduce graph holds exactly one allreduce, at its top level; applying none.
assert horovod_ops(accumulate_def.node) == [] and inner_ops(accumulate_def) == []
assert horovod_ops(apply_def.node) == [] and inner_ops(apply_def) == []
checksums = comm.allgather(float(sum(np.sum(v.numpy(), dtype=np.float64) for v in eng.variables)))
assert len(set(checksums)) == 1, checksums
print(f"rank {rank}: tensorflow dp checks passed", flush=True)
