"""Run under mpirun -np 2: a Keras 3 ``fit`` script written for horovod.tensorflow.keras.

Checks, on every rank (any failed assertion fails the rank, hence mpirun):

* before ``init()``, ``DistributedOptimizer`` is refused with a one-line error;
* ``model.fit`` with ``DistributedOptimizer`` and
  ``BroadcastGlobalVariablesCallback`` (ranks start from different weights)
  ends with the same weights on every rank, equal within 1e-5 to one process
  fitting the same global batches (SGD and Adam, fp32; also a wrapped
  ``LossScaleOptimizer``); ``broadcast_global_variables`` and ``broadcast``;
* ``backward_passes_per_step=4`` equals one pass over a 4x batch, and in the
  traced train step every Horovod op sits in the branch that runs on the
  4th pass only;
* the callbacks' effects: the learning rate at given steps (warm-up and
  schedule), metrics averaged and equal on every rank, the best model
  written by rank 0 only and reloaded by ``load_model`` as distributed;
* one-line errors: a compression or op the path cannot do, a bad
  optimizer, and mismatched shapes naming both ranks and shapes.
"""
import os
import shutil
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

import hvdllm.tensorflow as hvd_tf
import hvdllm.tensorflow.keras as hvd

try:
    hvd.DistributedOptimizer(keras.optimizers.SGD(0.1))
    raise AssertionError("DistributedOptimizer before init() accepted")
except ValueError as exc:
    assert "call hvd.init() first" in str(exc) and "\n" not in str(exc), exc

hvd.init()
rank, size = hvd.rank(), hvd.size()
assert size == 2, size
LOCAL, STEPS, FEATURES = 4, 6, 10
rng = np.random.default_rng(7)
X = rng.normal(size=(STEPS * LOCAL * size, FEATURES)).astype(np.float32)
Y = (X @ rng.normal(size=(FEATURES, 3)) + 0.1 * rng.normal(size=(len(X), 3))).astype(np.float32)


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0.0)) <= tol * max(
        1.0, float(np.max(np.abs(b), initial=0.0)))


def same_on_all_ranks(arrays):
    flat = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float32)
    copies = hvd.allgather(flat[None])
    return all(np.array_equal(copies[0], c) for c in copies)


def make_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(3)])


def make_optimizer(kind, lr=None):
    if kind == "sgd":
        return keras.optimizers.SGD(0.05 if lr is None else lr)
    return keras.optimizers.Adam(0.01 if lr is None else lr)


def local_rows(x, micro, passes=1):
    """This rank's rows: per optimizer step of size*passes*micro rows, its `passes` micro-batches."""
    step_rows = size * passes * micro
    out = []
    for s in range(len(x) // step_rows):
        block = x[s * step_rows:(s + 1) * step_rows]
        out.append(block[rank * passes * micro:(rank + 1) * passes * micro])
    return np.concatenate(out)


# -- equality with one process -----------------------------------------------------
for kind in ("sgd", "adam"):
    model = make_model(100 + rank)  # different on each rank: the callback must fix it
    model.compile(optimizer=hvd.DistributedOptimizer(make_optimizer(kind)), loss="mse")
    model.fit(local_rows(X, LOCAL), local_rows(Y, LOCAL), batch_size=LOCAL, shuffle=False,
              epochs=1, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    dist = model.get_weights()

    ref = make_model(100)  # rank 0's initial weights, which the broadcast gave everyone
    ref.compile(optimizer=make_optimizer(kind), loss="mse")
    ref.fit(X, Y, batch_size=LOCAL * size, shuffle=False, epochs=1, verbose=0)
    assert same_on_all_ranks(dist), kind
    errors = [float(np.max(np.abs(d - r))) for d, r in zip(dist, ref.get_weights())]
    assert all(close(d, r) for d, r in zip(dist, ref.get_weights())), (kind, errors)
    assert not all(close(d, w, 1e-3) for d, w in zip(dist, make_model(100).get_weights()))
    assert int(model.optimizer.iterations.numpy()) == STEPS

# A LossScaleOptimizer wrapped the same way: still equal to one process.
model = make_model(100)
model.compile(optimizer=hvd.DistributedOptimizer(
    keras.optimizers.LossScaleOptimizer(make_optimizer("sgd"))), loss="mse")
model.fit(local_rows(X, LOCAL), local_rows(Y, LOCAL), batch_size=LOCAL, shuffle=False, verbose=0)
ref = make_model(100)
ref.compile(optimizer=keras.optimizers.LossScaleOptimizer(make_optimizer("sgd")), loss="mse")
ref.fit(X, Y, batch_size=LOCAL * size, shuffle=False, verbose=0)
assert all(close(d, r) for d, r in zip(model.get_weights(), ref.get_weights()))

# broadcast_global_variables: the variables the distributed optimizers hold.
model = make_model(100 + rank)
optimizer = hvd.DistributedOptimizer(make_optimizer("adam"))
optimizer.build(model.trainable_variables)
assert not same_on_all_ranks(model.get_weights())
hvd.broadcast_global_variables(0)
assert same_on_all_ranks(model.get_weights())
assert np.array_equal(hvd.broadcast(np.arange(3) + rank, root_rank=1), np.arange(3) + 1)

# -- backward_passes_per_step=4 equals one pass over a 4x batch ----------------------
PASSES, MICRO = 4, 1
model = make_model(100)
optimizer = hvd.DistributedOptimizer(make_optimizer("sgd", 0.1), backward_passes_per_step=PASSES,
                                     average_aggregated_gradients=True)
model.compile(optimizer=optimizer, loss="mse")
history = model.fit(local_rows(X, MICRO, PASSES), local_rows(Y, MICRO, PASSES),
                    batch_size=MICRO, shuffle=False, epochs=1, verbose=0)
ref = make_model(100)
ref.compile(optimizer=make_optimizer("sgd", 0.1), loss="mse")
ref.fit(X[:len(X) // (size * PASSES * MICRO) * size * PASSES * MICRO],
        Y[:len(Y) // (size * PASSES * MICRO) * size * PASSES * MICRO],
        batch_size=size * PASSES * MICRO, shuffle=False, epochs=1, verbose=0)
assert int(optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy()) == \
    len(X) // (size * PASSES * MICRO)
assert all(close(d, r) for d, r in zip(model.get_weights(), ref.get_weights())), [
    float(np.max(np.abs(d - r))) for d, r in zip(model.get_weights(), ref.get_weights())]

# Where the communication lives in Keras's train step, traced (not run) as
# fit traces it: Horovod ops only in functions that are the then-branch of a
# conditional (the 4th pass), none in the step's own graph or else-branches.
graph_def = tf.function(model.train_step).get_concrete_function(
    (tf.TensorSpec([MICRO, FEATURES], tf.float32),
     tf.TensorSpec([MICRO, 3], tf.float32))).graph.as_graph_def()
functions = {f.signature.name: f for f in graph_def.library.function}


def horovod_ops(nodes):
    return [n.op for n in nodes if n.op.startswith("Horovod")]


def branches(nodes, attr):
    return {n.attr[attr].func.name for n in nodes if n.op in ("If", "StatelessIf")}


all_nodes = [list(graph_def.node)] + [list(f.node_def) for f in functions.values()]
then_branches = set().union(*(branches(nodes, "then_branch") for nodes in all_nodes))
else_branches = set().union(*(branches(nodes, "else_branch") for nodes in all_nodes))
with_horovod = {name for name, f in functions.items() if horovod_ops(f.node_def)}
assert not horovod_ops(graph_def.node)
assert with_horovod and with_horovod <= then_branches, (with_horovod, then_branches)
assert not with_horovod & else_branches

# -- callbacks -------------------------------------------------------------------------
STEPS_PER_EPOCH = 3


class Recorder(keras.callbacks.Callback):
    """The learning rate at each batch begin, and copies of the epoch logs."""

    def __init__(self):
        super().__init__()
        self.lrs, self.logs = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lrs.append(float(np.asarray(self.model.optimizer.learning_rate)))

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs or {}))


def fit_with(callbacks, epochs, lr=0.01, validation=False):
    model = make_model(5)
    model.compile(optimizer=hvd.DistributedOptimizer(make_optimizer("sgd", lr)), loss="mse",
                  metrics=["mae"])
    rows = STEPS_PER_EPOCH * LOCAL
    x = X[rank * rows:(rank + 1) * rows] * (1 + rank)  # different data: different local metrics
    y = Y[rank * rows:(rank + 1) * rows]
    extra = {"validation_data": (x[:LOCAL], y[:LOCAL])} if validation else {}
    model.fit(x, y, batch_size=LOCAL, shuffle=False, epochs=epochs, verbose=0,
              callbacks=callbacks, **extra)
    return model


# Warm-up: lr = initial / size * (e * (size - 1) / warmup + 1), e = epoch + (batch + 1) / steps.
recorder = Recorder()
INITIAL, WARMUP = 0.02 * size, 2
fit_with([hvd.callbacks.LearningRateWarmupCallback(INITIAL, warmup_epochs=WARMUP, verbose=1),
          recorder], epochs=3)
expected = []
for epoch in range(3):
    for batch in range(STEPS_PER_EPOCH):
        if epoch < WARMUP:
            e = epoch + (batch + 1) / STEPS_PER_EPOCH
            expected.append(INITIAL / size * (e * (size - 1) / WARMUP + 1))
        else:
            expected.append(expected[-1])
assert np.allclose(recorder.lrs, expected, rtol=1e-6), (recorder.lrs, expected)
assert np.isclose(recorder.lrs[WARMUP * STEPS_PER_EPOCH - 1], INITIAL)

# Schedule: x0.5 per epoch from epoch 1 to 3, staircase; untouched before and after.
recorder = Recorder()
fit_with([hvd.callbacks.LearningRateScheduleCallback(0.04, 0.5, start_epoch=1, end_epoch=3),
          recorder], epochs=4, lr=0.01)
per_epoch = [recorder.lrs[i * STEPS_PER_EPOCH:(i + 1) * STEPS_PER_EPOCH] for i in range(4)]
assert [set(np.round(e, 8)) for e in per_epoch] == [{0.01}, {0.04}, {0.02}, {0.02}], per_epoch
# ... and per batch when not staircase: the multiplier at fractional epochs.
recorder = Recorder()
fit_with([hvd.callbacks.LearningRateScheduleCallback(0.04, lambda e: 1.0 / (1.0 + e),
                                                     staircase=False), recorder], epochs=2)
assert np.allclose(recorder.lrs, [0.04 / (1 + e + b / STEPS_PER_EPOCH)
                                  for e in range(2) for b in range(STEPS_PER_EPOCH)]), recorder.lrs

# Metric averaging: the logs a later callback sees are the ranks' mean, equal everywhere.
before, after = Recorder(), Recorder()
fit_with([before, hvd.callbacks.MetricAverageCallback(), after], epochs=2, validation=True)
for b, a in zip(before.logs, after.logs):
    assert set(a) >= {"loss", "mae", "val_loss", "val_mae"}, a
    for key in ("loss", "mae", "val_loss", "val_mae"):
        local = hvd.allgather(np.array([b[key]], np.float64))
        assert local[0] != local[1], (key, local)  # the ranks really differed
        assert np.isclose(a[key], local.mean(), rtol=1e-6), (key, a[key], local)
        assert same_on_all_ranks([np.array([a[key]])]), key

# Best-model checkpoint: rank 0 writes; load_model gives a distributed optimizer back.
workdir = tempfile.mkdtemp(prefix=f"hvdllm-best-rank{rank}-")
path = os.path.join(workdir, "best.keras")
fit_with([hvd.callbacks.MetricAverageCallback(),
          hvd.callbacks.BestModelCheckpoint(monitor="val_loss", filepath=path)],
         epochs=2, validation=True)
assert os.path.exists(path) == (rank == 0), (rank, os.listdir(workdir))
if rank == 0:
    loaded = hvd.load_model(path)
    assert type(loaded.optimizer).__mro__[1].__name__ == "_DistributedOptimizerMixin"
    assert type(loaded.optimizer).__name__ == "SGD"
shutil.rmtree(workdir)

# -- one-line errors ---------------------------------------------------------------------


def refused(call, *words):
    try:
        call()
    except (ValueError, TypeError) as exc:
        text = str(exc)
        assert "\n" not in text and all(w in text for w in words), (text, words)
        return
    raise AssertionError(f"accepted: {words}")


def fit_topk():
    model = make_model(1)
    model.compile(optimizer=hvd.DistributedOptimizer(
        make_optimizer("sgd"), compression=hvd.Compression.topk(0.1)), loss="mse")
    model.fit(X[:LOCAL], Y[:LOCAL], batch_size=LOCAL, verbose=0)


refused(fit_topk, "Compression.topk", "run_eagerly=True")


def fit_xla():
    model = make_model(1)
    model.compile(optimizer=hvd.DistributedOptimizer(make_optimizer("sgd")), loss="mse",
                  jit_compile=True)
    model.fit(X[:LOCAL], Y[:LOCAL], batch_size=LOCAL, verbose=0)


refused(fit_xla, "XLA", "jit_compile=False")
refused(lambda: hvd.DistributedOptimizer(make_optimizer("sgd"), op=hvd_tf.Min), "op", "Average")
refused(lambda: hvd.DistributedOptimizer(object()), "Keras 3 optimizers")
refused(lambda: hvd.DistributedOptimizer(make_optimizer("sgd"), backward_passes_per_step=0),
        "backward_passes_per_step")
refused(lambda: hvd.allreduce(np.ones((3 + rank, 2), np.float32), name="uneven"),
        "'uneven'", "rank 0 sent shape [3, 2]", "rank 1 sent shape [4, 2]")
# The tape, eagerly, over models whose second layer differs: names the gradient.
keras.utils.set_random_seed(3)
odd = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(4),
                        keras.layers.Dense(2 + rank, name="head")])


def tape_step():
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(odd(X[:2]))
    hvd_tf.DistributedGradientTape(tape).gradient(loss, odd.trainable_variables)


refused(tape_step, "DistributedGradientTape gradient reduction", "head", "rank 0 sent shape",
        "rank 1 sent shape")
# After all those errors, the ranks still agree and communicate.
assert hvd.allreduce(np.array([1.0]), op=hvd.Sum)[0] == size
print(f"rank {rank}: tf keras drop-in check passed", flush=True)
sys.stdout.flush()
