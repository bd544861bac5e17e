"""Run under mpirun -np 2: the TensorFlow engine's DP gradient reductions.

1. ``reduce_op = "average"``: ``GradientUpdate.reduce`` sums a flat
   gradient buffer in place (the result is the sum of both ranks' buffers,
   written into the buffer that was passed) and ``apply`` divides by dp:
   one SGD step moves the weights by lr * mean gradient.
2. ``reduce_op = "adasum"``: each reduced gradient equals Adasum's formula
   for two ranks, a + b - (a.b / 2|a|^2) a - (a.b / 2|b|^2) b, per tensor,
   computed here from both ranks' gradients; a few training steps give
   finite losses and identical weights on both ranks.
"""
import sys

import numpy as np
import tensorflow as tf
from mpi4py import MPI

from hvdllm.common.config import build_config
from hvdllm.common.topology import Topology
from hvdllm.tensorflow import engine as engine_mod
from hvdllm.tensorflow.distributed import init_groups

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
assert size == 2, size
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=16",
        "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.framework=tensorflow", f"parallel.dp={size}"]
groups = init_groups(Topology(size), comm, 60.0)
rng = np.random.default_rng(100 + rank)
micro = [(rng.integers(0, 256, (2, 16)), rng.integers(0, 256, (2, 16)))]


def gathered(arrays):
    """Both ranks' copies of ``arrays``: a list (rank order) of lists."""
    return comm.allgather([np.asarray(a) for a in arrays])


# -- 1. the in-place sum, and its 1/dp in apply --------------------------------
eng = engine_mod.build_engine(build_config({}, TINY + ["train.optimizer=sgd", "train.lr=0.5",
                                                       "train.weight_decay=0",
                                                       "train.grad_clip=0"]),
                              groups, threads=1)
update = eng.update
assert update.in_place and eng._flat_grads
numel = sum(int(np.prod(v.shape)) for v in update.variables)
flat = tf.constant(rng.normal(size=numel).astype(np.float32)) + 0.0  # a buffer of our own
both = gathered([flat.numpy()])
want_sum = both[0][0] + both[1][0]
summed = update.reduce(flat)  # flat in, flat out: the optimizer graph cuts it
assert summed is flat and np.array_equal(flat.numpy(), want_sum), \
    "the flat buffer was not summed in place"
before = [v.numpy().copy() for v in update.variables]
update.apply(summed, 0.5)
step = np.concatenate([(b - v.numpy()).ravel() for b, v in zip(before, update.variables)])
np.testing.assert_allclose(step, 0.5 * want_sum / 2, rtol=1e-5, atol=1e-7)
# A list in (callers other than the trainer): per-variable views of the sum.
update = engine_mod.build_engine(build_config({}, TINY + ["train.optimizer=sgd", "train.lr=0.5",
                                                          "train.weight_decay=0",
                                                          "train.grad_clip=0"]),
                                 groups, threads=1).update
flat = tf.constant(rng.normal(size=numel).astype(np.float32)) + 0.0
want_sum = sum(g[0] for g in gathered([flat.numpy()]))
parts = update.reduce(update._in_place_sum.split(flat))
got = np.concatenate([p.numpy().ravel() for p in parts])
np.testing.assert_allclose(got, want_sum, rtol=1e-6)
assert [tuple(p.shape) for p in parts] == [tuple(v.shape) for v in update.variables]
before = [v.numpy().copy() for v in update.variables]
update.apply(parts, 0.5)
step = np.concatenate([(b - v.numpy()).ravel() for b, v in zip(before, update.variables)])
np.testing.assert_allclose(step, 0.5 * want_sum / 2, rtol=1e-5, atol=1e-7)
print(f"rank {rank}: in-place sum checks passed", flush=True)

# -- 2. Adasum -------------------------------------------------------------------
eng = engine_mod.build_engine(build_config({}, TINY + ["train.reduce_op=adasum"]), groups,
                              threads=1)
update = eng.update
assert not update.in_place and not eng._flat_grads
_, grads = eng._gradients(micro)
both = gathered(grads)
reduced = update.reduce(grads)
checked = 0
for a, b, r in zip(both[0], both[1], reduced):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (a @ a > 0 and b @ b > 0):
        continue
    checked += 1
    dot = a @ b
    want = a + b - dot / (2 * (a @ a)) * a - dot / (2 * (b @ b)) * b
    # Not the average, nor the sum: the projections must show.
    assert not np.allclose(want, (a + b) / 2, rtol=1e-3) and not np.allclose(want, a + b, rtol=1e-3)
    np.testing.assert_allclose(r.numpy().ravel(), want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
assert checked >= len(reduced) - 2, (checked, len(reduced))
losses = [eng.train_step(micro, lr=1e-2) for _ in range(3)]
assert all(np.isfinite(losses)), losses
checksums = comm.allgather([v.numpy().tobytes() for v in update.variables])
assert checksums[0] == checksums[1], "weights differ across ranks after Adasum steps"
print(f"rank {rank}: adasum checks passed", flush=True)
sys.stdout.flush()
