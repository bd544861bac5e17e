"""Run under mpirun -np 2 or 4: every TensorFlow TP mapping and layer against its dense twin.

All ranks form one TP group (tp = world size).  Dense Keras layers and
models are built on every rank from the same seed; the TP versions are
sliced from them.  Everything runs inside ``tf.function``.  Forward
outputs, losses and every gradient (gathered back to full) must agree with
the dense twin within 1e-5, with and without sequence parallelism, for each
mapping and layer and for whole GPT and LLaMA models (vocabulary 259, not a
multiple of tp; grouped-query attention; blocks recomputed in backward under
sequence parallelism).  The swapped models keep the dense model's variable
paths and order, start from exactly its weights, and hold exactly the
expected number of collectives (none from Horovod's own gradients).
"""
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(2)
tf.get_logger().setLevel("ERROR")  # the many small traced checks retrace by design

from hvdllm.common.comm import Group  # noqa: E402
from hvdllm.common.family import get_family  # noqa: E402
from hvdllm.common.tp_split import Split, shard  # noqa: E402
from hvdllm.tensorflow.distributed import import_horovod  # noqa: E402
from hvdllm.tensorflow.models import GPT, Llama, PositionEmbedding  # noqa: E402
from hvdllm.tensorflow.state import logical_variables  # noqa: E402
from hvdllm.tensorflow.tensor_parallel import (  # noqa: E402
    ColumnParallelDense, RowParallelDense, SequenceParallelPositionEmbedding,
    TensorParallelGroup, VocabParallelCrossEntropy, VocabParallelEmbedding,
    VocabParallelLMHead, copy_to_region, full_tensor, full_weights,
    gather_from_region, gather_from_sequence, padded_vocab_size, parallelize,
    reduce_from_region, reduce_scatter_to_sequence, replicated_variables, scatter_to_region,
    scatter_to_sequence, variable_split)

TOL = 1e-5
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
hvd = import_horovod()
hvd.init(comm=comm)
group = Group("tp", comm, range(size), timeout_sec=60, process_set=hvd.global_process_set)
tp = TensorParallelGroup(group, hvd=hvd)
checks = 0


def close(name, got, want, tol=TOL):
    global checks
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"rank {rank} tp={size}: {name} has shape {got.shape}, "
                             f"expected {want.shape}")
    err = float(np.abs(got - want).max()) if got.size else 0.0
    scale = max(1.0, float(np.abs(want).max()) if want.size else 0.0)
    if not err <= tol * scale:
        raise AssertionError(f"rank {rank} tp={size}: {name} differs by {err:.3e}")
    checks += 1


def part(a, axis):
    return np.split(np.asarray(a), size, axis=axis)[rank]


def dense_np(g):
    return tf.convert_to_tensor(g).numpy()


def value_and_grad(fn, x, weight):
    """fn(x) and the gradient of sum(fn(x) * weight) with respect to x, traced."""
    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fn(x)
            loss = tf.reduce_sum(out * weight)
        return out, tape.gradient(loss, x)

    out, grad = run(tf.constant(x, tf.float32))
    return out.numpy(), grad.numpy()


# -- the mappings, with expectations computed from rank and size ------------
x = np.full((2, 4 * size, 3), float(rank + 1), np.float32)
tri = size * (size + 1) / 2
out, grad = value_and_grad(lambda t: copy_to_region(t, tp), x, float(rank + 1))
close("copy_to_region forward", out, x)
close("copy_to_region backward", grad, np.full_like(x, tri))

out, grad = value_and_grad(lambda t: reduce_from_region(t, tp), x, float(rank + 1))
close("reduce_from_region forward", out, np.full_like(x, tri))
close("reduce_from_region backward", grad, np.full_like(x, rank + 1))

full = np.arange(2 * 3 * 4 * size, dtype=np.float32).reshape(2, 3, 4 * size)
out, grad = value_and_grad(lambda t: scatter_to_region(t, tp), full, 1.0)
close("scatter_to_region forward", out, part(full, -1))
close("scatter_to_region backward", grad, np.ones_like(full))  # gathered ones

out, grad = value_and_grad(lambda t: gather_from_region(t, tp), part(full, -1), full)
close("gather_from_region forward", out, full)
close("gather_from_region backward", grad, part(full, -1))

seq_full = np.random.default_rng(7).standard_normal((2, 4 * size, 5)).astype(np.float32)
out, grad = value_and_grad(lambda t: scatter_to_sequence(t, tp), seq_full, 1.0)
close("scatter_to_sequence forward", out, part(seq_full, 1))
close("scatter_to_sequence backward", grad, np.ones_like(seq_full))

out, grad = value_and_grad(lambda t: gather_from_sequence(t, tp), part(seq_full, 1),
                           float(rank + 1))
close("gather_from_sequence forward", out, seq_full)
close("gather_from_sequence backward", grad, np.full_like(part(seq_full, 1), tri))

out, grad = value_and_grad(lambda t: reduce_scatter_to_sequence(t, tp), seq_full * (rank + 1),
                           part(seq_full, 1))
close("reduce_scatter_to_sequence forward", out, part(seq_full, 1) * tri)
close("reduce_scatter_to_sequence backward", grad, seq_full)

b1 = np.random.default_rng(8).standard_normal((1, 4 * size, 5)).astype(np.float32)
out, grad = value_and_grad(lambda t: gather_from_sequence(t, tp), part(b1, 1), b1)
close("gather_from_sequence forward (batch 1)", out, b1)
close("gather_from_sequence backward (batch 1)", grad, part(b1, 1) * size)
out, grad = value_and_grad(lambda t: reduce_scatter_to_sequence(t, tp), b1, part(b1, 1))
close("reduce_scatter_to_sequence forward (batch 1)", out, part(b1, 1) * size)
close("reduce_scatter_to_sequence backward (batch 1)", grad, b1)

# -- layers against their dense twins -------------------------------------
rng = np.random.default_rng(1234)  # the same stream on every rank
keras.utils.set_random_seed(99)  # dense layers' initialisation: identical on every rank
d_in, d_out, b, t = 8, 4 * size * 3, 2, 4 * size


def kernel_part(kernel, split):
    """This rank's shard of a Keras (in, out) kernel, by the contract's (out, in) split."""
    return shard(np.asarray(kernel).T, split, rank, size).T


def dense(units, d, use_bias=True):
    layer = keras.layers.Dense(units, use_bias=use_bias)
    layer.build((None, d))
    if use_bias:
        layer.bias.assign(rng.standard_normal(units).astype(np.float32))
    return layer


def grads_of(fn, x, variables):
    """Loss fn(x), d loss / d x and d loss / d variables, traced."""
    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fn(x)
        gx, *gv = tape.gradient(loss, [x] + list(variables))
        return loss, gx, gv

    loss, gx, gv = run(tf.constant(x, tf.float32))
    return loss.numpy(), gx.numpy(), [dense_np(g) for g in gv]


for sequence_parallel in (False, True):
    tp.sequence_parallel = sequence_parallel
    tag = "sp" if sequence_parallel else "tp"
    seq = (lambda a: part(a, 1)) if sequence_parallel else (lambda a: a)

    # Column-parallel (plain, and fused q,k,v) feeding a row-parallel layer.
    for parts in (1, 3):
        col_dense, row_dense = dense(d_out, d_in), dense(d_in, d_out)
        col = ColumnParallelDense.from_dense(col_dense, tp, parts=parts)
        row = RowParallelDense.from_dense(row_dense, tp)
        x_full = rng.standard_normal((b, t, d_in)).astype(np.float32)
        y_dense = col_dense(x_full).numpy()
        # This rank's columns of y: [q_r k_r v_r] when fused.
        order = shard(np.arange(d_out), Split.column(parts), rank, size)
        if parts == 1:
            close("row kernel slice", row.kernel.numpy(), row_dense.kernel.numpy()[order], 0)
        else:  # the row layer reads the fused columns in the column layer's order
            row.kernel.assign(row_dense.kernel.numpy()[order])

        def dense_fn(z):
            y = row_dense(tf.nn.gelu(col_dense(z), approximate=True))
            return tf.reduce_sum(y * y)

        def tp_fn(z):
            y = row(tf.nn.gelu(col(z), approximate=True))
            return tf.reduce_sum(y * y)

        close(f"{tag} column forward (parts={parts})",
              col(tf.constant(seq(x_full))).numpy(), y_dense[..., order])
        loss_d, gx_d, (gck, gcb, grk, grb) = grads_of(
            dense_fn, x_full, [col_dense.kernel, col_dense.bias, row_dense.kernel,
                               row_dense.bias])
        loss_t, gx_t, (tck, tcb, trk, trb) = grads_of(
            tp_fn, seq(x_full), [col.kernel, col.bias, row.kernel, row.bias])
        if sequence_parallel:  # each rank's loss covers its part of the sequence
            loss_t = comm.allreduce(float(loss_t))
        close(f"{tag} column->row loss (parts={parts})", loss_t, loss_d)
        close(f"{tag} column->row input grad (parts={parts})", gx_t, seq(gx_d))
        close(f"{tag} column kernel grad (parts={parts})", tck, gck[:, order])
        close(f"{tag} column bias grad (parts={parts})", tcb, gcb[order])
        close(f"{tag} row kernel grad (parts={parts})", trk, grk[order])
        if sequence_parallel:  # a replicated variable that saw part of the sequence
            assert not np.allclose(trb, grb), "a partial row-bias gradient was expected"
            trb = dense_np(tp.all_reduce_grads([tf.constant(trb)], [row.bias])[0])
        close(f"{tag} row bias grad (parts={parts})", trb, grb)
        assert col.kernel.hvdllm_split == Split.column(parts) and col.kernel.hvdllm_tp_sharded
        assert row.kernel.hvdllm_split == Split.row()
        assert row.bias is row_dense.bias, "the replicated bias is the dense layer's variable"
        assert variable_split(row.bias) == Split.replicated()
        restored = ColumnParallelDense(tp=tp, **col.get_config())
        assert restored.get_config() == col.get_config()
        restored.build((None, d_in))  # a layer of its own, initialised by its initializers
        assert restored.kernel.shape == col.kernel.shape and restored.kernel.numpy().any()
        checks += 1

    # gather_output and a row layer that splits its own input (no sequence split).
    if not sequence_parallel:
        col_dense, row_dense = dense(d_out, d_in), dense(d_in, d_out)
        col = ColumnParallelDense.from_dense(col_dense, tp)
        col.gather_output = True
        row = RowParallelDense.from_dense(row_dense, tp, input_is_parallel=False)
        x_full = rng.standard_normal((b, t, d_in)).astype(np.float32)
        close("column gather_output forward", col(tf.constant(x_full)).numpy(),
              col_dense(x_full).numpy())
        _, gx_d, (grk,) = grads_of(lambda z: tf.reduce_sum(row_dense(col_dense(z)) ** 2),
                                   x_full, [row_dense.kernel])
        _, gx_t, (trk,) = grads_of(lambda z: tf.reduce_sum(row(col(z)) ** 2), x_full,
                                   [row.kernel])
        close("gather_output + split-input row: input grad", gx_t, gx_d)
        close("split-input row kernel grad", trk, part(grk, 0))

    # Vocabulary-parallel embedding, head and cross-entropy; 259 is not a multiple of tp.
    vocab = 259
    emb_dense = keras.layers.Embedding(vocab, d_in)
    emb_dense.build((None, None))
    head_dense = dense(vocab, d_in, use_bias=False)
    emb = VocabParallelEmbedding.from_dense(emb_dense, tp)
    head = VocabParallelLMHead.from_dense(head_dense, tp)
    loss_fn = VocabParallelCrossEntropy(vocab, tp)
    per = padded_vocab_size(vocab, size) // size
    assert emb.embeddings.shape[0] == per and head.kernel.shape[1] == per
    idx = rng.integers(0, vocab, (b, t))
    idx[0, 0], idx[0, 1] = vocab - 1, 0  # the last real id and the first
    targets = rng.integers(0, vocab, (b, t))
    targets[1, :2] = vocab - 1

    @tf.function
    def dense_vocab(idx, targets):
        with tf.GradientTape() as tape:
            logits = head_dense(tf.tanh(emb_dense(idx)))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                targets, logits, from_logits=True))
        return emb_dense(idx), logits, loss, tape.gradient(
            loss, [emb_dense.embeddings, head_dense.kernel])

    @tf.function
    def tp_vocab(idx, targets):
        with tf.GradientTape() as tape:
            h = emb(idx)
            logits = head(tf.tanh(h))
            loss = loss_fn(logits, targets)
        return h, loss_fn.full_logits(logits), loss, tape.gradient(
            loss, [emb.embeddings, head.kernel])

    h_d, logits_d, loss_d, (gemb_d, ghead_d) = dense_vocab(idx, targets)
    h_t, logits_t, loss_t, (gemb_t, ghead_t) = tp_vocab(idx, targets)
    close(f"{tag} vocab embedding forward", h_t.numpy(), seq(h_d.numpy()))
    close(f"{tag} vocab-parallel cross-entropy", loss_t.numpy(), loss_d.numpy())
    close(f"{tag} full logits", logits_t.numpy(), logits_d.numpy())
    padded = padded_vocab_size(vocab, size)
    gemb_full = np.zeros((padded, d_in), np.float32)
    gemb_full[:vocab] = dense_np(gemb_d)
    ghead_full = np.zeros((d_in, padded), np.float32)
    ghead_full[:, :vocab] = dense_np(ghead_d)
    close(f"{tag} embedding grad", dense_np(gemb_t), gemb_full[rank * per:(rank + 1) * per])
    close(f"{tag} head kernel grad", dense_np(ghead_t), ghead_full[:, rank * per:(rank + 1) * per])
    close(f"{tag} embedding grad gathered", full_tensor(emb.embeddings, tp, gemb_t),
          dense_np(gemb_d))
    close(f"{tag} head grad gathered", full_tensor(head.kernel, tp, ghead_t), dense_np(ghead_d))
    pos_dense = PositionEmbedding(t)
    pos_dense.build((None, None, d_in))
    pos = SequenceParallelPositionEmbedding.from_dense(pos_dense, tp)
    assert pos.embeddings is pos_dense.embeddings
    close(f"{tag} positions", pos(tf.zeros(seq(np.zeros((b, t, d_in))).shape)).numpy(),
          seq(pos_dense.embeddings.numpy()[None])[0])
    for layer in (emb, head, pos, RowParallelDense.from_dense(dense(d_in, d_out), tp)):
        config = layer.get_config()  # the group is not part of it: pass it again
        assert type(layer)(tp=tp, **config).get_config() == config, type(layer).__name__
        checks += 1
    if rank == size - 1:  # padded rows never get a gradient
        assert not dense_np(ghead_t)[:, -1].any() and not dense_np(gemb_t)[-1].any()
        assert not emb.embeddings.numpy()[-1].any() and not head.kernel.numpy()[:, -1].any()

# Cross-entropy alone with a vocabulary whose last rank may hold only padding (tp=4: 5 ids).
tp.sequence_parallel = False
small = size + 1
loss_fn = VocabParallelCrossEntropy(small, tp)
logits_full = rng.standard_normal((2, 3, padded_vocab_size(small, size))).astype(np.float32)
logits_full[..., small:] = 0.0
targets = rng.integers(0, small, (2, 3))
local = part(logits_full, -1)
loss_t, g_t = value_and_grad(lambda z: loss_fn(z, targets), local, 1.0)
real = tf.constant(logits_full[..., :small])
with tf.GradientTape() as tape:
    tape.watch(real)
    loss_d = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, real,
                                                                         from_logits=True))
g_d = np.zeros_like(logits_full)
g_d[..., :small] = tape.gradient(loss_d, real).numpy()
close("cross-entropy with padding-only columns", loss_t, loss_d.numpy())
close("cross-entropy gradient with padding-only columns", g_t, part(g_d, -1))

# -- whole models: logits, loss and every gradient ------------------------
GQA_KV = 2 if size == 2 else size


def build(family):
    keras.utils.set_random_seed(5)
    if family == "gpt":
        model = GPT(vocab_size=259, seq_len=4 * size, n_layer=2, n_head=4, d_model=8 * size)
    else:
        model = Llama(vocab_size=259, seq_len=4 * size, n_layer=2, n_head=8, n_kv_head=GQA_KV,
                      d_model=8 * size, d_ff=16 * size)
    model.build((None, model.seq_len))
    return model


def model_shape(model, family):
    """What the family contract reads off a config, read off a Keras model."""
    return SimpleNamespace(family=family, n_layer=model.n_layer,
                           n_head=model.n_head, d_model=model.d_model, seq_len=model.seq_len,
                           vocab_size=model.vocab_size,
                           kv_heads=getattr(model, "n_kv_head", model.n_head),
                           ff_width=model.d_ff)


def inner(path):
    return path.split("/", 1)[-1]


def train_step(model, tensor_parallel, with_logits=True):
    variables = model.trainable_variables

    @tf.function
    def step(idx, tgt):
        with tf.GradientTape() as tape:
            logits = model(idx, training=True)
            loss = model.criterion(logits, tgt)
        grads = tape.gradient(loss, variables)
        if tensor_parallel:
            grads = tp.all_reduce_grads(grads, variables)
        if not with_logits:
            return loss, grads
        return loss, model.criterion.full_logits(logits), grads

    return step


for family in ("gpt", "llama"):
    dense_model = build(family)
    next_draw = keras.random.uniform((4,)).numpy()  # Keras's global generator after the build
    idx = rng.integers(0, 259, (2, dense_model.seq_len))
    tgt = np.roll(idx, -1, 1)
    dense_loss, dense_logits, dense_grads = train_step(dense_model, False)(idx, tgt)
    dense_weights = full_weights(dense_model)
    dense_paths = [inner(v.path) for v in dense_model.trainable_variables]
    for sequence_parallel in (False, True):
        tp.sequence_parallel = sequence_parallel
        tag = f"{family} {'sp' if sequence_parallel else 'tp'}"
        model = parallelize(build(family), tp)
        assert np.array_equal(keras.random.uniform((4,)).numpy(), next_draw), \
            "parallelize drew random numbers"
        model.recompute = sequence_parallel  # blocks recomputed in backward: collectives too
        variables = model.trainable_variables
        # Only the shards and the replicated variables, each once, in the dense model's order.
        assert [inner(v.path) for v in variables] == dense_paths, \
            ([inner(v.path) for v in variables], dense_paths)
        assert len({id(v) for v in variables}) == len(variables)
        assert all(not variable_split(v).sharded for v in replicated_variables(model))
        n_sharded = sum(bool(getattr(v, "hvdllm_tp_sharded", False)) for v in variables)
        assert n_sharded == len(variables) - len(replicated_variables(model)) > 0
        # The checkpoint code finds every stored tensor on the swapped layers.
        spec = get_family(family).spec(model_shape(dense_model, family))
        held = logical_variables(model, spec)
        assert len(held) == len(spec.stored), [name for name, *_ in held]
        assert {id(v) for _, v, _ in held} == {id(v) for v in variables}
        weights = full_weights(model)
        for key, value in dense_weights.items():  # tp=N starts from exactly tp=1's weights
            assert np.array_equal(weights[key], value), f"{tag}: initial {key} differs"
        loss, logits, grads = train_step(model, True)(idx, tgt)
        close(f"{tag} model loss", loss.numpy(), dense_loss.numpy())
        close(f"{tag} model full logits", logits.numpy(), dense_logits.numpy())
        for v, g, gd in zip(variables, grads, dense_grads):
            close(f"{tag} grad {inner(v.path)}", full_tensor(v, tp, g), dense_np(gd))
        with tp.sequence_parallel_off():
            out = model.generate(idx[0, :3], 3, seed=1)
        ref = dense_model.generate(idx[0, :3], 3, seed=1)
        assert np.array_equal(out, ref), (out, ref)
        checks += 1
tp.sequence_parallel = False

# -- collective count: LLaMA's q, k, v (and gate, up) share one input collective,
# and nothing differentiates through Horovod's own gradients.
n_layer = 3
keras.utils.set_random_seed(5)
model = Llama(vocab_size=64, seq_len=8, n_layer=n_layer, n_head=8, n_kv_head=GQA_KV,
              d_model=8 * size, d_ff=16 * size)
model.build((None, 8))
parallelize(model, tp)
step = train_step(model, True, with_logits=False)
idx = rng.integers(0, 64, (2, 8))
graph = step.get_concrete_function(tf.constant(idx), tf.constant(idx)).graph.as_graph_def()
ops = [n.op for n in graph.node if n.op.startswith("Horovod")]
ops += [n.op for fn in graph.library.function for n in fn.node_def if n.op.startswith("Horovod")]
# forward: embedding, (wo, w_down) per layer, the loss's one allgather; backward:
# (q|k|v, gate|up) per layer, the head's input.
expected = 1 + 2 * n_layer + 1 + 2 * n_layer + 1
assert len(ops) == expected, (ops, expected)
checks += 1

print(f"rank {rank}: tf tp layer checks passed ({checks} comparisons)", flush=True)
