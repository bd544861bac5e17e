"""Run under mpirun -np 2 or 4 (every rank one stage): the TensorFlow pipeline executor.

Usage: tf_pp_check.py CASE [CASE...] | tf_pp_check.py fail

A case is ``family:schedule[:option...]`` with options ``recompute``,
``dropout`` (dropout 0.1), ``parameters`` / ``balanced`` (partition).
For each case, one step of the pipeline must give the single-process loss
(on every stage) and the gradient of every variable within 1e-5: each
stage compares the variables it holds, and the union over the stages must
be the whole model, and the stages must hold disjoint variables, except
GPT's tied embedding, whose last-stage copy is marked
``hvdllm_pp_duplicate``.  With dropout the masks must be the single
process's, recompute included.  The case ``family:steps`` checks that

* three AdamW steps keep the single-process loss and the tied copies
  bit-identical;
* ``forward_logits`` gives the single-process logits and sampling through
  the pipeline the single-process text.

``fail``: the last stage raises in a forward of its second step; the job
must end at once with that stage's traceback (checked by the test).
"""
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from mpi4py import MPI

from hvdllm.common.config import build_config
from hvdllm.common.failure import install_failure_handler
from hvdllm.common.topology import Topology
from hvdllm.tensorflow.distributed import init_groups
from hvdllm.tensorflow.models import MODEL_CLASSES
from hvdllm.tensorflow.pipeline import build_pipeline, plan_split

TOL = 1e-5
SEQ, BATCH, SEED = 16, 2, 1234
MODEL = {
    "gpt": ["model.family=gpt", "model.n_head=4", "model.d_model=32"],
    "llama": ["model.family=llama", "model.n_head=4", "model.n_kv_head=2", "model.d_model=32",
              "model.d_ff=64"],
}

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
install_failure_handler(comm)
failing = sys.argv[1] == "fail"
groups = init_groups(Topology(dp=1, tp=1, pp=size), comm, timeout_sec=600.0 if failing else 60.0)
checks = 0


def config(family, schedule="1f1b", recompute=False, dropout=0.0, partition="uniform"):
    v = 2 if schedule == "interleaved" else 1
    m = 2 * size  # interleaved needs a multiple of pp micro-batches
    # The config checks know the TensorFlow adapter by its declared
    # capabilities; the executor reads only the model, parallel and train sizes.
    return build_config({}, MODEL[family] + [
        f"model.n_layer={2 * size}", f"model.seq_len={SEQ}", f"model.dropout={dropout}",
        f"parallel.pp={size}", f"parallel.schedule={schedule}",
        f"parallel.virtual_stages={v}", f"parallel.partition={partition}",
        f"parallel.recompute={'full' if recompute else 'none'}",
        f"train.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH * m}",
        f"train.seed={SEED}"])


def full_model(cfg):
    keras.utils.set_random_seed(cfg.train.seed)
    model = MODEL_CLASSES[cfg.model.family].from_model_config(cfg.model)
    model.build((None, cfg.model.seq_len))
    return model


def stage(cfg):
    model = full_model(cfg)
    executor = build_pipeline(model, plan_split(model, cfg, groups), cfg, groups, None)
    return model, executor


def name(variable):
    """A variable's path without the model's name (``gpt`` or ``gpt_2``)."""
    return variable.path.split("/", 1)[1]


def micro_batches(m, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(m, BATCH, SEQ + 1), dtype=np.int64)
    return [(t[:, :-1].copy(), t[:, 1:].copy()) for t in tokens]


def reference_step(model, batches):
    """Single-process loss and gradients by variable path, accumulated as the engine does."""
    total, grads = 0.0, None
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = model.next_token_loss(x, y, training=True)
            scaled = loss / len(batches)
        more = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, model.trainable_variables)]
        grads = more if grads is None else [a + b for a, b in zip(grads, more)]
        total += float(loss)
    return total / len(batches), {name(v): g for v, g in zip(model.trainable_variables, grads)}


def close(what, got, want, tol=TOL):
    global checks
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    if got.shape != want.shape or not err <= tol * scale:
        raise AssertionError(f"stage {rank}/{size}: {what} differs by {err:.3e} "
                             f"(shapes {got.shape} {want.shape})")
    checks += 1


def check_case(case):
    family, schedule, *options = case.split(":")
    cfg = config(family, schedule, "recompute" in options,
                 0.1 if "dropout" in options else 0.0,
                 next((o for o in options if o in ("parameters", "balanced")), "uniform"))
    batches = micro_batches(cfg.grad_accum_steps, seed=len(case))
    ref_loss, ref_grads = reference_step(full_model(cfg), batches)
    model, executor = stage(cfg)
    assert [name(v) for v in executor.variables] == [name(v) for v in model.trainable_variables]
    loss, grads = executor.train_step(batches)
    grads = executor.reduce_tied_grads(grads)
    close(f"{case} loss", loss, ref_loss)
    assert len(grads) == len(executor.variables) > 0, f"stage {rank}: {len(grads)} gradients"
    for v, g in zip(executor.variables, grads):
        close(f"{case} gradient of {name(v)}", g, ref_grads[name(v)])
    held = comm.allgather(sorted(name(v) for v in executor.variables))
    missing = set(ref_grads) - {path for paths in held for path in paths}
    assert not missing, f"{case}: no stage holds {sorted(missing)}"
    check_layout(family, executor)


def check_layout(family, executor):
    """Disjoint stages; GPT's tied embedding on the first and the last, the copy marked."""
    global checks
    held = comm.allgather([(name(v), bool(getattr(v, "hvdllm_pp_duplicate", False)))
                           for v in executor.variables])
    owners = {}
    for s, paths in enumerate(held):
        for path, duplicate in paths:
            owners.setdefault(path, []).append((s, duplicate))
    shared = {path: who for path, who in owners.items() if len(who) > 1}
    if family == "gpt":
        assert list(shared) == ["token_embedding/embeddings"], shared
        assert shared["token_embedding/embeddings"] == [(0, False), (size - 1, True)], shared
        assert executor.tied_variable is not None or rank not in (0, size - 1)
    else:
        assert not shared, shared
        assert executor.tied_variable is None
    checks += 1


def check_optimizer_steps(family):
    """Three AdamW steps: the single-process losses, tied copies bit-identical."""
    global checks
    cfg = config(family)
    model, executor = stage(cfg)
    reference = full_model(cfg)
    opt = keras.optimizers.AdamW(learning_rate=1e-2)
    ref_opt = keras.optimizers.AdamW(learning_rate=1e-2)
    for step in range(3):
        batches = micro_batches(cfg.grad_accum_steps, seed=10 + step)
        loss, grads = executor.train_step(batches)
        opt.apply(executor.reduce_tied_grads(grads), executor.variables)
        ref_loss, ref_grads = reference_step(reference, batches)
        ref_opt.apply([ref_grads[name(v)] for v in reference.trainable_variables],
                      reference.trainable_variables)
        close(f"loss after {step} AdamW steps", loss, ref_loss)
    if executor.tied_variable is not None:
        mine = executor.tied_variable.value
        other = executor.link.exchange(tf.convert_to_tensor(mine), executor.tied_peer, 0,
                                       "tied weight check")
        assert np.array_equal(other.numpy(), mine.numpy()), \
            f"stage {rank}: tied embedding copies differ by {np.abs(other - mine).numpy().max()}"
        close("tied weight against one process", mine,
              reference.token_embedding.embeddings.numpy())
    elif family == "gpt" and rank in (0, size - 1):
        raise AssertionError(f"stage {rank}: GPT's first and last stages must hold the tied "
                             f"weight")
        checks += 1
    return executor, reference


def check_generation(executor, reference):
    idx = micro_batches(1, seed=3)[0][0][:, :11]
    close("forward_logits", executor.forward_logits(idx), reference(idx))
    prompt = np.array([1, 2, 3], np.int64)
    got = executor.language_model().generate(prompt, 8, seed=5)
    want = reference.generate(prompt, 8, seed=5)
    assert np.array_equal(got, want), f"stage {rank}: sampled {got} but one process {want}"


def fail():
    """The last stage raises in the forward of its second step's first micro-batch."""

    class FailingCriterion:
        def __init__(self, inner):
            self.inner = inner
            self.armed = tf.Variable(0, trainable=False)

        def __call__(self, logits, targets):
            tf.debugging.assert_equal(self.armed, 0, message=f"deliberate failure in the "
                                      f"forward of stage {rank}")
            return self.inner(logits, targets)

        def full_logits(self, logits):
            return self.inner.full_logits(logits)

    cfg = config("llama")
    model = full_model(cfg)
    criterion = FailingCriterion(model.criterion)
    model.set_criterion(criterion)
    executor = build_pipeline(model, plan_split(model, cfg, groups), cfg, groups, None)
    executor.train_step(micro_batches(cfg.grad_accum_steps))  # a clean first step
    if rank == size - 1:
        criterion.armed.assign(1)
        print(f"raising at {time.time():.3f}", flush=True)
    executor.train_step(micro_batches(cfg.grad_accum_steps))
    raise AssertionError(f"stage {rank} finished a step that a failed stage took part in")


if failing:
    fail()
for case in sys.argv[1:]:
    started = time.perf_counter()
    if case.endswith(":steps"):
        check_generation(*check_optimizer_steps(case.split(":")[0]))
    else:
        check_case(case)
    if rank == 0:
        print(f"{case}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
print(f"tf pp checks passed on stage {rank} ({checks} checks)", flush=True)
