"""Run under mpirun -np 2: the torch DP engine's communication pattern.

Checks that (a) micro-batches before the last start no allreduce, (b) the
last micro-batch's allreduces start from inside backward() (overlap), one
per gradient bucket, with several buckets when they are small, and (c)
parameters stay identical across ranks after steps on different data.
"""
import sys

import numpy as np
from mpi4py import MPI

from hvdllm.common.config import build_config
from hvdllm.common.topology import Topology
from hvdllm.torch import engine as engine_mod
from hvdllm.torch.distributed import import_horovod, init_groups

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
cfg = build_config({}, [f"parallel.dp={size}", "train.global_batch_size=8",
                        f"train.micro_batch_size={8 // (2 * size)}"])
groups = init_groups(Topology(size), comm, 60.0)
eng = engine_mod.build_engine(cfg, groups, threads=1)
hvd = import_horovod()
# Small buckets so that the model (about 0.5 MB of gradients) spans several.
eng.update.sync.remove()
eng.update.sync = type(eng.update.sync)(eng.model.named_parameters(), groups.dp, hvd, bucket_bytes=64 * 1024)
n_buckets = len(eng.update.sync.buckets)
assert n_buckets >= 4, n_buckets
assert sum(len(b.params) for b in eng.update.sync.buckets) == len(list(eng.model.parameters()))

sync = eng.update.sync
# Host buckets go over in-place MPI on the sync's thread unless
# HVDLLM_DP_TRANSPORT=horovod (sys.argv[1] says which this run expects).
want = sys.argv[1] if len(sys.argv) > 1 else "mpi"
assert sync.transport == want, (sync.transport, want)
events = []
phase = {"micro": None, "in_backward": False}


def counting(original):
    def call(*args, **kwargs):
        events.append((phase["micro"], phase["in_backward"]))
        return original(*args, **kwargs)
    return call


def forbidden(*args, **kwargs):
    raise AssertionError(f"a gradient bucket left the {want} transport")


if want == "mpi":
    sync._mpi.submit = counting(sync._mpi.submit)
    hvd.allreduce_async_ = forbidden
else:
    hvd.allreduce_async_ = counting(hvd.allreduce_async_)
loss_cls = type(eng.model)
orig_loss = loss_cls.loss


class TrackedLoss:
    """Wraps the loss tensor so backward() marks the phase it runs in."""

    def __init__(self, t):
        self.t = t

    def __truediv__(self, n):
        return TrackedLoss(self.t / n)

    def __mul__(self, factor):
        return TrackedLoss(self.t * factor)

    def backward(self):
        phase["in_backward"] = True
        self.t.backward()
        phase["in_backward"] = False

    def item(self):
        return self.t.item()


def tracked_loss(self, x, y):
    phase["micro"] = 0 if phase["micro"] is None else phase["micro"] + 1
    return TrackedLoss(orig_loss(self, x, y))


loss_cls.loss = tracked_loss
rng = np.random.default_rng(rank)
accum = cfg.grad_accum_steps
assert accum == 2, accum
micro = [(rng.integers(0, 256, (cfg.train.micro_batch_size, 64)),
          rng.integers(0, 256, (cfg.train.micro_batch_size, 64))) for _ in range(accum)]
for step in range(3):
    events.clear()
    phase["micro"] = None
    eng.train_step(micro, lr=1e-3)
    assert len(events) == n_buckets, (len(events), n_buckets)
    assert all(m == accum - 1 for m, _ in events), f"allreduce before the last micro-batch: {events}"
    assert all(inside for _, inside in events), "allreduce started after backward returned"
checksums = comm.allgather(float(sum(p.double().sum() for p in eng.model.parameters())))
assert len(set(checksums)) == 1, checksums
print(f"rank {rank}: torch dp checks passed", flush=True)
