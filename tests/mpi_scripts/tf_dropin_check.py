"""Run under mpirun -np 2: a script written for horovod.tensorflow, import swapped.

Checks, on every rank (any failed assertion fails the rank, hence mpirun):

* every name used before ``hvd.init()`` is refused with a one-line error;
* the raw collectives, compared with values computed from rank and size;
* ``broadcast_variables`` of a Keras 3 model's and optimizer's variables;
* a custom ``tf.function`` loop with ``DistributedGradientTape`` (SGD and
  Adam) ends with the same weights on every rank, equal within 1e-5 to one
  process training on the same global batches (and so does an eager loop);
* each compression, op and option of the tape, against the exact average;
* ``SyncBatchNormalization`` equals one process normalizing the global
  batch (outputs, input and parameter gradients, moving statistics);
* one-line errors for what a path cannot do.
"""
import os

import numpy as np
import tensorflow as tf
import keras

import hvdllm.tensorflow as hvd

def traced_before_init():
    return hvd.allreduce(tf.ones(2)) * 2.0


for misuse in (lambda: hvd.rank(), lambda: hvd.allreduce(tf.ones(2)),
               lambda: hvd.broadcast_variables([tf.Variable(1.0)], root_rank=0),
               lambda: hvd.DistributedGradientTape(tf.GradientTape()), lambda: hvd.barrier(),
               lambda: tf.function(traced_before_init)()):
    try:
        misuse()
        raise AssertionError("used before init() and accepted")
    except ValueError as exc:
        assert "call hvd.init() first" in str(exc) and "\n" not in str(exc), exc

os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # for add_process_set below
hvd.init()
rank, size = hvd.rank(), hvd.size()
assert hvd.is_initialized() and 0 <= hvd.local_rank() < hvd.local_size() <= size
ranks_sum = size * (size - 1) / 2


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0.0)) <= tol * max(
        1.0, float(np.max(np.abs(b), initial=0.0)))


def same_on_all_ranks(values, name):
    flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in values], axis=0)
    copies = hvd.allgather(flat[None], name=f"check.{name}").numpy()
    return all(np.array_equal(copies[0], c) for c in copies)


# -- raw collectives ----------------------------------------------------------
t = tf.fill([3], float(rank))
assert close(hvd.allreduce(t, name="avg"), np.full(3, ranks_sum / size))
assert close(hvd.allreduce(t, op=hvd.Sum, name="sum"), np.full(3, ranks_sum))
assert close(hvd.allreduce(t, compression=hvd.Compression.fp16, name="fp16"),
             np.full(3, ranks_sum / size))
a, b = hvd.grouped_allreduce([t, 2 * t], op=hvd.Sum, name="grouped")
assert close(a, np.full(3, ranks_sum)) and close(b, np.full(3, 2 * ranks_sum))
gathered = hvd.allgather(tf.fill([rank + 1, 2], float(rank)), name="gather").numpy()
assert gathered[:, 0].tolist() == [float(r) for r in range(size) for _ in range(r + 1)]
assert float(hvd.broadcast(tf.constant([float(rank)]), root_rank=size - 1, name="b")[0]) \
    == size - 1
received = hvd.alltoall(tf.fill([size], float(rank)), name="a2a").numpy()
assert received.tolist() == [float(r) for r in range(size)]
scattered = hvd.reducescatter(tf.reshape(tf.range(2 * size, dtype=tf.float32), [2 * size, 1]),
                              op=hvd.Sum, name="rs").numpy()
assert close(scattered[:, 0], [size * (2 * rank), size * (2 * rank + 1)])
assert hvd.broadcast_object({"from": rank}, root_rank=0) == {"from": 0}
assert hvd.allgather_object(rank) == list(range(size))
hvd.barrier()


@tf.function
def traced_allreduce(x):
    return hvd.allreduce(x, op=hvd.Sum, name="traced")


assert close(traced_allreduce(t), np.full(3, ranks_sum))

# -- broadcast_variables on Keras 3 ---------------------------------------------
keras.utils.set_random_seed(10 + rank)  # different weights on each rank: broadcast must fix them
probe = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dropout(0.1),
                          keras.layers.BatchNormalization(), keras.layers.Dense(3)])
flags = [tf.Variable(rank == 0), tf.Variable(np.uint32(2**32 - 1 - rank))]
probe_opt = keras.optimizers.Adam(1e-3)
probe_opt.build(probe.trainable_variables)
for v in probe_opt.variables:
    v.assign(tf.cast(tf.fill(v.shape, rank + 1), v.dtype))  # iterations (int) too
assert size == 1 or not same_on_all_ranks(probe.variables, "probe.before")
assert any(v.dtype == "int64" for v in probe.variables)  # Dropout's seed state
hvd.broadcast_variables(probe.variables + list(probe_opt.variables) + flags, root_rank=0)
assert same_on_all_ranks(probe.variables + list(probe_opt.variables), "probe.after")
assert int(probe_opt.iterations.numpy()) == 1
assert bool(flags[0].numpy()) and int(flags[1].numpy()) == 2**32 - 1, flags


@tf.function
def traced_broadcast():
    hvd.broadcast_variables(probe.variables, root_rank=size - 1)


keras.utils.set_random_seed(20 + rank)
for v in probe.variables:
    v.assign(tf.random.normal(v.shape))
mine = [v.numpy() for v in probe.variables]
traced_broadcast()
assert same_on_all_ranks(probe.variables, "probe.traced")
assert rank != size - 1 or all(np.array_equal(m, v.numpy()) for m, v in zip(mine, probe.variables))

# -- training equality with one process ----------------------------------------
STEPS, LOCAL_BATCH = 6, 8
rng = np.random.default_rng(7)  # the same global batches on every rank
batches = [(rng.standard_normal((LOCAL_BATCH * size, 10)).astype(np.float32),
            rng.standard_normal((LOCAL_BATCH * size, 4)).astype(np.float32))
           for _ in range(STEPS)]


def make_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(4)])


def make_optimizer(kind):
    return keras.optimizers.SGD(0.1) if kind == "sgd" else keras.optimizers.Adam(0.01)


def train(kind, distributed, traced):
    """Weights after STEPS steps: this rank's share of each global batch, or all of it."""
    model = make_model(100 + rank)
    optimizer = make_optimizer(kind)
    if distributed:
        hvd.broadcast_variables(model.variables, root_rank=0)
    else:  # rank 0's initial weights, like the broadcast gives
        model.set_weights([np.asarray(w) for w in
                           hvd.broadcast_object(model.get_weights(), root_rank=0)])

    def step(x, y):
        # Both of Horovod's spellings: wrap the recorded tape, or enter a wrapped one.
        wrap_first = distributed and not traced
        with (hvd.DistributedGradientTape(tf.GradientTape()) if wrap_first
              else tf.GradientTape()) as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        if distributed and not wrap_first:
            tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    step = tf.function(step) if traced else step
    for x, y in batches:
        if distributed:
            x, y = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], \
                y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        step(tf.constant(x), tf.constant(y))
    return model.get_weights()


for kind, traced in (("sgd", True), ("adam", True), ("adam", False)):
    dist = train(kind, True, traced)
    ref = train(kind, False, traced)
    assert same_on_all_ranks(dist, f"train.{kind}.{traced}"), (kind, traced)
    assert all(close(d, r, 1e-5) for d, r in zip(dist, ref)), (kind, traced, [
        float(np.max(np.abs(d - r))) for d, r in zip(dist, ref)])
    initial = make_model(100).get_weights()  # rank 0's, broadcast to all
    assert not any(close(d, w, 1e-3) for d, w in zip(dist, initial)), "training did not move"

# -- the tape's compressions, ops and options -----------------------------------
w = keras.Variable(np.zeros((6, 4), np.float32), name="w")
bias = keras.Variable(np.zeros((4,), np.float32), name="bias")
u = np.linspace(1.0, 2.0, 6).astype(np.float32)
local = {r: (np.outer(u, np.arange(4) + 1.0 + 3 * r).astype(np.float32),  # rank-1, shared u
             np.full(4, r + 1.0, np.float32)) for r in range(size)}
exact = [np.mean([local[r][i] for r in range(size)], axis=0) for i in range(2)]


def reduced(traced=False, **options):
    """``gradient()`` of a target whose local gradients are ``local[rank]``."""
    gw, gb = (tf.constant(g) for g in local[rank])

    def run():
        with tf.GradientTape() as tape:
            target = tf.reduce_sum(w * gw) + tf.reduce_sum(bias * gb)
        return hvd.DistributedGradientTape(tape, **options).gradient(target, [w, bias])

    return [g.numpy() for g in (tf.function(run)() if traced else run())]


for traced in (False, True):
    for compression, tol in ((hvd.Compression.none, 1e-6), (hvd.Compression.fp16, 1e-3),
                             (hvd.Compression.bf16, 1e-2)):
        out = reduced(traced, compression=compression)
        assert all(close(o, e, tol) for o, e in zip(out, exact)), (compression, traced, out)
        assert same_on_all_ranks(out, f"compression.{traced}")
    out = reduced(traced, op=hvd.Sum)
    assert all(close(o, e * size) for o, e in zip(out, exact))
    out = reduced(traced, gradient_predivide_factor=2.0)
    assert all(close(o, e) for o, e in zip(out, exact))
# top-k with ratio 1 is the exact average; PowerSGD is exact on these rank-1 gradients.
for compression in (hvd.Compression.topk(1.0), hvd.Compression.powersgd(1)):
    out = reduced(compression=compression)
    assert all(close(o, e, 1e-5) for o, e in zip(out, exact)), (compression, out)
# Top-k keeps what it did not send (error feedback), across tapes: after two
# steps, what was sent plus the average residual is twice the exact average.
sparse_topk = hvd.Compression.topk(0.25)  # sends 6 of the 24 entries of w, 1 of bias's 4
outs = [reduced(compression=sparse_topk) for _ in range(2)]
for out in outs:
    assert same_on_all_ranks(out, "topk") and not close(out[0], exact[0], 1e-3)
    assert np.count_nonzero(out[0]) <= 6 * size
compressor = hvd.DistributedGradientTape(tf.GradientTape(), compression=sparse_topk).compressor
assert compressor.steps == 2 and sorted(compressor.residuals) == ["0:w", "1:bias"], \
    sorted(compressor.residuals)
for i, key in enumerate(("0:w", "1:bias")):
    residual = hvd.allreduce(compressor.residuals[key], name=f"residual.{i}").numpy()
    assert close(outs[0][i] + outs[1][i] + residual.reshape(exact[i].shape), 2 * exact[i]), i
if size == 2:  # Adasum of orthogonal gradients is their sum
    orthogonal = keras.Variable(np.zeros(2, np.float32))
    with tf.GradientTape() as tape:
        target = tf.reduce_sum(orthogonal * tf.one_hot(rank, 2))
    got = hvd.DistributedGradientTape(tape, op=hvd.Adasum).gradient(target, [orthogonal])[0]
    assert close(got, [1.0, 1.0]), got

if size == 2:  # a process set of this rank alone: nothing to average with
    alone = [hvd.add_process_set([r]) for r in range(size)][rank]
    assert close(hvd.allreduce(t, process_set=alone, name="alone"), t)
    out = reduced(process_set=alone)
    assert all(close(o, g) for o, g in zip(out, local[rank])), out
    out = reduced(True, process_set=hvd.global_process_set)
    assert all(close(o, e) for o, e in zip(out, exact))

# Sparse gradients (an embedding lookup), as Horovod's allgather or densified.
emb = keras.layers.Embedding(10, 3)
emb.build((None,))
for as_dense in (False, True):
    with tf.GradientTape() as tape:
        target = tf.reduce_sum(emb(tf.constant([rank, 5])))
    got = hvd.DistributedGradientTape(tape, sparse_as_dense=as_dense).gradient(
        target, emb.trainable_variables)[0]
    assert isinstance(got, tf.IndexedSlices) != as_dense, type(got)
    want = np.zeros((10, 3), np.float32)
    for r in range(size):
        want[[r, 5]] += 1.0 / size
    assert close(tf.convert_to_tensor(got), want), (as_dense, got)

# Gradients of local layers stay local (divided by size, as Horovod does), others averaged.
mlp = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2), keras.layers.Dense(1)])
with tf.GradientTape() as tape:
    target = tf.reduce_sum(mlp(tf.fill([1, 2], float(rank + 1))))
plain = tape.gradient(target, mlp.trainable_variables)
with tf.GradientTape() as tape:
    target = tf.reduce_sum(mlp(tf.fill([1, 2], float(rank + 1))))
partial = hvd.PartialDistributedGradientTape(tape, local_layers=mlp.layers[0]).gradient(
    target, mlp.trainable_variables)
assert close(partial[0], plain[0].numpy() / size) and close(partial[1], plain[1].numpy() / size)
assert same_on_all_ranks(partial[2:], "partial")

# -- SyncBatchNormalization: statistics and gradients of the global batch ----------
# Each rank normalizes its 3 rows (channels last, a 2-D spatial input); the
# outputs, the input gradients and the gamma/beta gradients summed over ranks
# equal one BatchNormalization over the 6 rows, in one process.
bn_x = np.random.default_rng(11).normal(2.0, 3.0, size=(3 * size, 4, 4, 5)).astype(np.float32)
bn_c = np.random.default_rng(12).normal(size=bn_x.shape).astype(np.float32)
mine = slice(3 * rank, 3 * rank + 3)


@tf.function
def sync_bn_step(layer, x, c):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * c)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return y, dx, hvd.allreduce(dgamma, op=hvd.Sum), hvd.allreduce(dbeta, op=hvd.Sum)


sync_bn = hvd.SyncBatchNormalization(momentum=0.5)
plain_bn = keras.layers.BatchNormalization(momentum=0.5)
sync_bn.build(bn_x[mine].shape)
plain_bn.build(bn_x.shape)
got = sync_bn_step(sync_bn, tf.constant(bn_x[mine]), tf.constant(bn_c[mine]))
want = sync_bn_step(plain_bn, tf.constant(bn_x), tf.constant(bn_c))
assert close(got[0], want[0].numpy()[mine], 1e-4) and close(got[1], want[1].numpy()[mine], 1e-4)
# want's are the same full-batch gradients summed over `size` ranks
assert close(got[2], want[2].numpy() / size, 1e-4), (got[2], want[2])
assert close(got[3], want[3].numpy() / size, 1e-4)
assert close(sync_bn.moving_mean, plain_bn.moving_mean.numpy(), 1e-5)
assert close(sync_bn.moving_variance, plain_bn.moving_variance.numpy(), 1e-4)
local_bn = keras.layers.BatchNormalization(momentum=0.5)  # what no synchronization gives
local_bn(tf.constant(bn_x[mine]), training=True)
assert not close(local_bn.moving_mean, plain_bn.moving_mean.numpy(), 1e-3)

# -- one-line errors for what a path cannot do -----------------------------------
def refused(call, *words):
    try:
        call()
    except (TypeError, ValueError) as exc:
        assert all(word in str(exc) for word in words) and "\n" not in str(exc), exc
        return
    raise AssertionError(f"accepted: {words}")


refused(lambda: reduced(True, compression=hvd.Compression.topk(0.5)), "Compression.topk")
refused(lambda: reduced(True, compression=hvd.Compression.powersgd(2)), "Compression.powersgd")
refused(lambda: reduced(compression=hvd.Compression.powersgd(2), op=hvd.Sum),
        "Compression.powersgd", "op")
refused(lambda: hvd.allreduce(tf.ones(2), compression=hvd.Compression.bf16), "Compression.bf16")
refused(lambda: reduced(op=hvd.Min), "op")
refused(lambda: hvd.SyncBatchNormalization(fused=True), "fused")
refused(lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), "Keras 3",
        "DistributedGradientTape")
assert 0 <= int(hvd.join()) < size
print(f"rank {rank}: tf drop-in check passed", flush=True)
