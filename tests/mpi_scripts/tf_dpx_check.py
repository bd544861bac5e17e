"""Run under mpirun -np 2: TensorFlow data-parallel depth against references.

One launch, three layouts of the same two ranks (dp=2, tp=2, pp=2):

* compressors (none, fp16, bf16, topk with warm-up and error feedback,
  powersgd with warm-up, error feedback and warm start) against a numpy
  simulation of the common algorithm fed every rank's gradients, over
  three steps; results identical on both ranks; byte counts as
  hvdllm.common.compression counts them;
* ZeRO-1 (through GradientUpdate) against unsharded Keras AdamW fed the
  same gradients, 20 steps, within 1e-5 relative, with and without
  clipping; its state per rank is 1/dp; its checkpoint tensors round-trip
  (both forms) and agree with Keras AdamW's slots;
* fp16: an inf on ONE rank makes both ranks skip the step and back off the
  loss scale (pp=2 without ZeRO, dp=2 with ZeRO-1);
* clipping over tp=2 (sharded and replicated variables), pp=2 (with a
  tied duplicate) and dp=2 gives the single-process norm and update;
* a Keras GPT trains under the mixed_bfloat16 and mixed_float16 policies
  (fp32 variables and loss), replicas staying identical.
"""
import keras
import ml_dtypes
import numpy as np
import tensorflow as tf
from mpi4py import MPI

from hvdllm.common.compression import half_wire_bytes, wire_bytes
from hvdllm.common.config import build_config
from hvdllm.common.launch import configure_horovod_env
from hvdllm.common.topology import Topology, build_groups
from hvdllm.tensorflow.clip import PP_DUPLICATE_ATTR, TP_SHARDED_ATTR
from hvdllm.tensorflow.compression import make_compressor, powersgd_initial_q
from hvdllm.tensorflow.data_parallel import broadcast_variables
from hvdllm.tensorflow.distributed import import_horovod
from hvdllm.tensorflow.precision import float32_criterion, precision_policy
from hvdllm.tensorflow.update import GradientUpdate, build_optimizer

TIMEOUT_SEC = 60.0
SHAPES = {"w": (40, 24), "b": (24,), "conv": (8, 3, 5), "s": (5,)}


def init_layouts(layouts):
    """Initialise Horovod once for every (dp, tp, pp); return hvd and the groups of each."""
    comm = MPI.COMM_WORLD
    hvd = import_horovod()
    topologies = [Topology(*layout) for layout in layouts]
    ranks = {}
    for topo in topologies:
        for r in topo.process_set_ranks():
            ranks.setdefault(r, None)
    configure_horovod_env(TIMEOUT_SEC)
    psets = {r: hvd.ProcessSet(list(r)) for r in ranks}
    hvd.init(comm=comm, process_sets=list(psets.values()))
    return hvd, [build_groups(topo, comm, timeout_sec=TIMEOUT_SEC, process_sets=psets,
                              global_process_set=hvd.global_process_set) for topo in topologies]


def config(*sets):
    return build_config({}, list(sets))


def same_on_all_ranks(group, array, what):
    copies = group.allgather(np.asarray(array, np.float64))
    assert all(np.array_equal(copies[0], c) for c in copies[1:]), f"{what} differs across ranks"


def rank_grads(rank, step, shapes=SHAPES):
    rng = np.random.default_rng(1000 * step + rank)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


# -- compression ---------------------------------------------------------------------------
def topk_ratio_at(ratio, warmup, step):
    start = max(ratio, 0.25)
    return ratio if step >= warmup else start * (ratio / start) ** (step / warmup)


def reference_half(all_grads, dtype):
    """fp16/bf16: 16-bit wire, fp32 partial sums, 16-bit average."""
    out = {}
    for n in SHAPES:
        wire = np.stack([g[n].astype(dtype).astype(np.float32) for g in all_grads])
        avg = (wire.sum(0) / len(all_grads)).astype(np.float32)
        out[n] = avg.astype(dtype).astype(np.float32)
    return out


def reference_topk(all_grads, residuals, ratio):
    from hvdllm.common.compression import topk_count

    out = {}
    for n, shape in SHAPES.items():
        dense = np.zeros(int(np.prod(shape)), np.float64)
        for r, g in enumerate(all_grads):
            acc = g[n].reshape(-1).astype(np.float64) + residuals[r].get(n, 0.0)
            k = topk_count(acc.size, ratio)
            index = np.argsort(-np.abs(acc), kind="stable")[:k]
            np.add.at(dense, index, acc[index])
            acc[index] = 0.0
            residuals[r][n] = acc
        out[n] = (dense / len(all_grads)).reshape(shape)
    return out


def reference_powersgd(all_grads, errors, qs, rank, seed):
    from hvdllm.common.compression import (matrix_shape, powersgd_compresses,
                                           powersgd_effective_rank)

    out = {}
    world = len(all_grads)
    for n, shape in SHAPES.items():
        if not powersgd_compresses(shape, rank):
            out[n] = np.mean([g[n].astype(np.float64) for g in all_grads], axis=0)
            continue
        rows, cols = matrix_shape(shape)
        q = qs.get(n)
        if q is None:
            q = powersgd_initial_q(seed, n, cols, powersgd_effective_rank(shape, rank))
            q = q.numpy().astype(np.float64)
        ms = [g[n].reshape(rows, cols).astype(np.float64) + errors[r].get(n, 0.0)
              for r, g in enumerate(all_grads)]
        p = np.linalg.qr(sum(m @ q for m in ms) / world)[0]
        q = sum(m.T @ p for m in ms) / world
        approx = p @ q.T
        for r, m in enumerate(ms):
            errors[r][n] = m - approx
        qs[n] = q
        out[n] = approx.reshape(shape)
    return out


def check_compression(dp, hvd):
    world = dp.size
    for mode, kw in (("none", {}), ("fp16", {}), ("bf16", {}),
                     ("topk", dict(topk_ratio=0.1, warmup_steps=2)),
                     ("powersgd", dict(powersgd_rank=2, seed=3, warmup_steps=1))):
        comp = make_compressor(mode, dp, hvd, **kw)
        residuals = [{} for _ in range(world)]
        errors, qs = [{} for _ in range(world)], {}
        for step in range(3):
            all_grads = [rank_grads(r, step) for r in range(world)]
            mine = all_grads[dp.rank]
            got = dict(zip(SHAPES, (t.numpy() for t in comp.reduce(
                [tf.constant(g) for g in mine.values()], list(mine)))))
            for n in SHAPES:
                same_on_all_ranks(dp, got[n], f"{mode} result of {n}")
            mean = {n: np.mean([g[n].astype(np.float64) for g in all_grads], axis=0)
                    for n in SHAPES}
            tol = 1e-6
            if mode == "none":
                want = mean
                nbytes = sum(wire_bytes("none", s, world) for s in SHAPES.values())
            elif mode in ("fp16", "bf16"):
                want = reference_half(all_grads, np.float16 if mode == "fp16"
                                      else ml_dtypes.bfloat16)
                tol = 0.0
                nbytes = half_wire_bytes(sum(int(np.prod(s)) for s in SHAPES.values()), world)
            elif mode == "topk":
                ratio = topk_ratio_at(0.1, 2, step)
                want = reference_topk(all_grads, residuals, ratio)
                nbytes = sum(wire_bytes("topk", s, world, topk_ratio=ratio)
                             for s in SHAPES.values())
                for n in SHAPES:  # error feedback: this rank's residual is what it kept
                    np.testing.assert_allclose(comp.residuals[n].numpy(),
                                               residuals[dp.rank][n], rtol=0, atol=1e-6)
            elif step < 1:  # powersgd warm-up: uncompressed
                want = mean
                nbytes = sum(wire_bytes("none", s, world) for s in SHAPES.values())
            else:
                want = reference_powersgd(all_grads, errors, qs, 2, 3)
                tol = 1e-5
                nbytes = sum(wire_bytes("powersgd", s, world, powersgd_rank=2)
                             for s in SHAPES.values())
            for n in SHAPES:
                scale = max(1.0, float(np.abs(want[n]).max()))
                err = float(np.abs(got[n] - want[n]).max())
                assert err <= tol * scale, f"{mode} step {step} {n}: off by {err:.2e}"
            assert comp.last_step_bytes == nbytes, (mode, step, comp.last_step_bytes, nbytes)
        if mode == "powersgd":
            state = comp.state_dict()
            again = make_compressor(mode, dp, hvd, **kw)
            again.load_state_dict(state)
            assert again.steps == 3 and set(again.errors) == set(comp.errors) == {"w", "conv"}
    print(f"rank {dp.rank}: compression checks passed", flush=True)


# -- ZeRO-1 --------------------------------------------------------------------------------
ZERO_SHAPES = {"w1": (7, 5), "b1": (5,), "w2": (5, 3), "b2": (3,), "s": (1,)}


def fresh_variables():
    rng = np.random.default_rng(7)
    return [keras.Variable(rng.standard_normal(s).astype(np.float32), name=n)
            for n, s in ZERO_SHAPES.items()]


def max_rel_gap(a, b):
    return max(float(np.abs(x.numpy() - y.numpy()).max() / np.abs(y.numpy()).max())
               for x, y in zip(a, b))


def check_zero(groups, hvd):
    dp = groups.dp
    for clip in (0.0, 0.5):
        sets = ["train.lr=0.01", "train.weight_decay=0.1", "train.beta2=0.95",
                f"train.grad_clip={clip}"]
        ref_vars, zero_vars = fresh_variables(), fresh_variables()
        ref = GradientUpdate(ref_vars, build_optimizer(ref_vars, config(*sets)), config(*sets),
                             groups, hvd)
        zcfg = config(*sets, "train.zero=1")
        zero = GradientUpdate(zero_vars, build_optimizer(zero_vars, zcfg), zcfg, groups, hvd)
        assert zero.zero and not ref.zero
        clipped = 0
        for step in range(20):
            lr = 0.01 * (step + 1) / 20
            grads = [tf.constant(g) for g in rank_grads(dp.rank, step, ZERO_SHAPES).values()]
            want = ref.apply(ref.reduce(grads), lr)
            got = zero.apply(zero.reduce(grads), lr)
            gap = max_rel_gap(zero_vars, ref_vars)
            assert gap < 1e-5, f"ZeRO-1 (clip {clip}) step {step}: relative gap {gap:.2e}"
            assert got.comm_bytes == want.comm_bytes > 0
            if clip:
                assert abs(got.grad_norm - want.grad_norm) < 1e-6 * want.grad_norm
                clipped += want.grad_norm > clip
            else:
                assert got.grad_norm is None and want.grad_norm is None
        if clip:
            assert clipped > 10, "clipping never engaged"
        for v in zero_vars:
            same_on_all_ranks(dp, v.numpy(), f"ZeRO-1 variable {v.path}")
        opt = zero.optimizer
        assert opt.state_bytes() * dp.size == 3 * 4 * opt.layout.padded
        # Checkpoint tensors: full form against Keras AdamW's own slots.
        full = opt.gather_state_tensors()
        slots = {v.path.rsplit("/", 1)[-1]: v for v in ref.optimizer.variables}
        assert full["steps"] == 20 == int(ref.optimizer.iterations.numpy())
        for i, v in enumerate(ref_vars):
            for kind, suffix in (("exp_avg", "momentum"), ("exp_avg_sq", "velocity")):
                slot = slots[v.path.replace("/", "_") + "_" + suffix].numpy()
                assert np.abs(full[kind][i] - slot).max() <= 1e-5 * np.abs(slot).max(), kind
        # Both forms restore a fresh ZeRO-1 optimizer that then steps exactly as the original.
        copies = []
        for state in (opt.state_tensors(), full):
            copy_vars = fresh_variables()
            for c, v in zip(copy_vars, zero_vars):
                c.assign(v)
            copy = GradientUpdate(copy_vars, build_optimizer(copy_vars, zcfg), zcfg, groups, hvd)
            copy.optimizer.load_state_tensors(state)
            copies.append((copy, copy_vars))
        grads = [tf.constant(g) for g in rank_grads(dp.rank, 99, ZERO_SHAPES).values()]
        zero.apply(grads, 1e-3)
        for copy, copy_vars in copies:
            copy.apply(grads, 1e-3)
            assert max_rel_gap(copy_vars, zero_vars) == 0.0, "restored ZeRO-1 state differs"
    print(f"rank {dp.rank}: zero checks passed", flush=True)


# -- fp16 overflow agreement ---------------------------------------------------------------
def check_overflow(groups, hvd, zero):
    me = groups.world.rank
    sets = ["train.precision=fp16"] + (["train.zero=1", "train.lr=0.01"] if zero else
                                       ["train.optimizer=sgd", "train.momentum=0",
                                        "train.lr=1.0"])
    cfg = config(*sets)
    variables = fresh_variables()
    update = GradientUpdate(variables, build_optimizer(variables, cfg), cfg, groups, hvd)
    scale = update.loss_scale
    assert scale == 2.0**16
    before = [v.numpy().copy() for v in variables]
    grads = [g * scale for g in rank_grads(me, 0, ZERO_SHAPES).values()]
    if me == 1:  # only rank 1 overflows
        grads[0][0, 0] = np.inf
    info = update.apply(update.reduce([tf.constant(g) for g in grads]), 1.0)
    assert not info.applied and info.as_metrics()["skipped"] is True
    assert info.loss_scale == update.loss_scale == scale / 2
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(variables, before))
    scale = update.loss_scale
    clean = rank_grads(me, 1, ZERO_SHAPES)
    info = update.apply(update.reduce([tf.constant(g * scale) for g in clean.values()]), 1.0)
    assert info.applied and info.as_metrics()["skipped"] is False
    assert info.loss_scale == scale
    if not zero:  # plain SGD at lr 1: the update is the unscaled gradient
        for v, b, g in zip(variables, before, clean.values()):
            np.testing.assert_allclose(v.numpy(), b - g, rtol=0, atol=1e-6)
    else:
        assert any(not np.array_equal(v.numpy(), b) for v, b in zip(variables, before))
        for v in variables:
            same_on_all_ranks(groups.dp, v.numpy(), "ZeRO-1 fp16 variable")
    print(f"rank {me}: fp16 overflow checks passed ({'zero' if zero else 'pp'})", flush=True)


# -- clipping over tp, pp and dp -----------------------------------------------------------
def check_clipping(groups, hvd, kind):
    me = groups.world.rank
    rng = np.random.default_rng(11)
    full = {"W": rng.standard_normal((6, 8)), "b": rng.standard_normal(8),
            "E": rng.standard_normal((10, 4))}
    grads = {n: rng.standard_normal(a.shape) for n, a in full.items()}
    if kind == "dp":  # each rank a different gradient; the norm is the average's
        mine = {n: g * (1 + me) for n, g in grads.items()}
        grads = {n: g * 1.5 for n, g in grads.items()}
        local = [("W", full["W"], mine["W"], {}), ("b", full["b"], mine["b"], {}),
                 ("E", full["E"], mine["E"], {})]
    elif kind == "tp":  # W split by columns; b and E replicated
        cols = slice(4 * me, 4 * me + 4)
        local = [("W", full["W"][:, cols], grads["W"][:, cols], {TP_SHARDED_ATTR: True}),
                 ("b", full["b"], grads["b"], {}), ("E", full["E"], grads["E"], {})]
    else:  # pp: stage 0 holds E and W, stage 1 b and the tied copy of E
        local = ([("E", full["E"], grads["E"], {}), ("W", full["W"], grads["W"], {})] if me == 0
                 else [("b", full["b"], grads["b"], {}),
                       ("E", full["E"], grads["E"], {PP_DUPLICATE_ATTR: True})])
    norm = float(np.sqrt(sum(np.sum(g * g) for g in grads.values())))
    max_norm = 0.25 * norm
    cfg = config("train.optimizer=sgd", "train.momentum=0", "train.lr=1.0",
                 f"train.grad_clip={max_norm}")
    variables = []
    for name, value, _, attrs in local:
        v = keras.Variable(value.astype(np.float32), name=name)
        for attr, flag in attrs.items():
            setattr(v, attr, flag)
        variables.append(v)
    update = GradientUpdate(variables, build_optimizer(variables, cfg), cfg, groups, hvd)
    grads_in = [tf.constant(g.astype(np.float32)) for _, _, g, _ in local]
    info = update.apply(update.reduce(grads_in), 1.0)
    assert abs(info.grad_norm - norm) < 1e-5 * norm, (kind, info.grad_norm, norm)
    coef = max_norm / (norm + 1e-6)
    for v, (name, value, g, _) in zip(variables, local):
        g_avg = grads[name] if kind == "dp" else g
        np.testing.assert_allclose(v.numpy(), value - coef * g_avg, rtol=0, atol=1e-5)
    print(f"rank {me}: clipping checks passed ({kind})", flush=True)


# -- mixed precision policies --------------------------------------------------------------
def check_policy_trains(groups, hvd, precision):
    from hvdllm.tensorflow.models import MODEL_CLASSES

    dp = groups.dp
    cfg = build_config({}, ["model.n_layer=2", "model.d_model=32", "model.n_head=4",
                            "model.seq_len=16", "train.lr=1e-2",
                            f"train.precision={precision}"])
    policy = precision_policy(cfg)
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(dp.rank)  # different weights: the broadcast must fix them
        model = MODEL_CLASSES["gpt"].from_model_config(cfg.model)
        model.build((None, 16))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.set_criterion(float32_criterion(model.criterion))
    variables = list(model.trainable_variables)
    assert {v.dtype for v in variables} == {"float32"}
    broadcast_variables(variables, dp, hvd)
    update = GradientUpdate(variables, build_optimizer(variables, cfg), cfg, groups, hvd)
    rng = np.random.default_rng(dp.rank)
    x = tf.constant(rng.integers(0, 256, (4, 16)))
    y = tf.constant(np.roll(x.numpy(), -1, axis=1))

    @tf.function
    def loss_and_grads(scale):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = model.next_token_loss(x, y, training=True)
            scaled = loss * scale
        return logits, loss, tape.gradient(scaled, variables)

    losses = []
    for _ in range(12):
        logits, loss, grads = loss_and_grads(tf.constant(update.loss_scale, tf.float32))
        assert logits.dtype == {"bf16": tf.bfloat16, "fp16": tf.float16}[precision]
        assert loss.dtype == tf.float32 and all(g.dtype == tf.float32 for g in grads)
        info = update.apply(update.reduce(grads), 1e-2)
        assert info.applied
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses
    if precision == "fp16":
        assert info.loss_scale == 2.0**16
    else:
        assert info.loss_scale is None
    for v in variables:
        same_on_all_ranks(dp, v.numpy(), f"{precision} variable {v.path}")
    print(f"rank {dp.rank}: {policy} trains ({losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)


def main():
    hvd, (dp2, tp2, pp2) = init_layouts([(2, 1, 1), (1, 2, 1), (1, 1, 2)])
    assert dp2.dp.size == tp2.tp.size == pp2.pp.size == 2
    check_compression(dp2.dp, hvd)
    check_zero(dp2, hvd)
    check_overflow(pp2, hvd, zero=False)
    check_overflow(dp2, hvd, zero=True)
    for groups, kind in ((tp2, "tp"), (pp2, "pp"), (dp2, "dp")):
        check_clipping(groups, hvd, kind)
    for precision in ("bf16", "fp16"):
        check_policy_trains(dp2, hvd, precision)
    print(f"rank {dp2.rank}: tensorflow dp depth checks passed", flush=True)


if __name__ == "__main__":
    main()
