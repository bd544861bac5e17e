"""Run under mpirun -np 2: what the torch DP engine's reduced gradients are.

Argument: the ``train.reduce_op`` ("average" or "adasum").  Each rank
computes its local gradients on a copy of the model with plain autograd;
after the engine's step every ``p.grad`` must be the average of the ranks'
local gradients ("average": Sum with 1/dp folded into the loss), or
Horovod's two-rank Adasum of them, per parameter ("adasum").  Also checks
that the gradients live in the buckets across steps and that dropping one
(``set_to_none``) is refused with a clear error.
"""
import copy
import sys

import numpy as np
import torch
from mpi4py import MPI

from hvdllm.common.config import build_config
from hvdllm.common.topology import Topology
from hvdllm.torch import engine as engine_mod
from hvdllm.torch.distributed import init_groups

op = sys.argv[1]
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
cfg = build_config({}, [f"parallel.dp={size}", "train.global_batch_size=8",
                        f"train.micro_batch_size={8 // (2 * size)}", f"train.reduce_op={op}"])
groups = init_groups(Topology(size), comm, 60.0)
eng = engine_mod.build_engine(cfg, groups, threads=1)
sync = eng.update.sync
assert sync is not None and sync.op == op
if len(sys.argv) > 2:  # the transport this run expects ("mpi" or "horovod")
    assert sync.transport == sys.argv[2], (sync.transport, sys.argv[2])
rng = np.random.default_rng(100 + rank)


def batches():
    return [(rng.integers(0, 256, (cfg.train.micro_batch_size, 64)),
             rng.integers(0, 256, (cfg.train.micro_batch_size, 64)))
            for _ in range(cfg.grad_accum_steps)]


def local_grads(model, micro):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    for x, y in micro:
        (ref.loss(torch.from_numpy(x), torch.from_numpy(y)) / len(micro)).backward()
    return {n: p.grad.double().numpy().copy() for n, p in ref.named_parameters()}


def adasum2(a, b):
    dot = float((a * b).sum())
    na, nb = float((a * a).sum()), float((b * b).sum())
    return (1 - dot / (2 * na)) * a + (1 - dot / (2 * nb)) * b


worst = 0.0
for step in range(3):
    micro = batches()
    mine = local_grads(eng.model, micro)
    every = comm.allgather(mine)
    eng.train_step(micro, lr=1e-3)
    for name, p in eng.model.named_parameters():
        got = p.grad.double().numpy()
        if op == "average":
            want = sum(g[name] for g in every) / size
        else:
            want = adasum2(every[0][name], every[1][name])
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        worst = max(worst, err)
        assert err < 1e-4, (step, name, err)
        assert any(v.data_ptr() == p.grad.data_ptr() for b in sync.buckets for v in b.views), name
eng.update.optimizer.zero_grad(set_to_none=True)
try:
    eng.train_step(batches(), lr=1e-3)
except RuntimeError as exc:
    assert "no longer a view into its data-parallel bucket" in str(exc), exc
else:
    raise AssertionError("a gradient set to None was not noticed")
print(f"rank {rank}: torch dp grads {op} passed, worst rel err {worst:.2e}", flush=True)
