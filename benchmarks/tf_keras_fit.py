"""Keras 3 ``model.fit`` at 2 ranks: hvdllm's drop-in against MultiWorkerMirroredStrategy.

    python benchmarks/tf_keras_fit.py [--rounds 3] [--steps 30] [--diagnose] [--quick]

Both sides train the same MLP (fp32, Adam, same seed, same data, same
global batch) with ``model.fit`` at 2 processes on this machine:

* ``hvdllm``: ``import hvdllm.tensorflow.keras as hvd``,
  ``hvd.DistributedOptimizer`` and ``BroadcastGlobalVariablesCallback(0)``,
  launched with ``mpirun -np 2``;
* ``mwms``: ``tf.distribute.MultiWorkerMirroredStrategy`` (ring
  collectives over gRPC, TensorFlow's choice on CPUs) at 2 workers, two
  processes on localhost given ``TF_CONFIG``, the data handed out with
  ``distribute_datasets_from_function``;
* ``plain_1``: plain Keras in one process on one rank's half of each batch,
  no communication: the compute in each step of the two sides above.

``--diagnose`` adds ``hvdllm_1`` (``mpirun -np 1``) and ``mwms_1`` (one
worker): each side's own machinery at one rank, with nothing to send;
``plain_2``: two ``plain_1`` processes at once, each on its rank's half,
never talking: the compute of a 2-rank step with both cores busy; and
``sync``: the pieces of one gradient sync at 2 ranks, timed alone (see
:func:`sync_parts`), from a raw mpi4py ``Allreduce`` up.  The
sides without communication train on their rank's half of each batch only,
so their loss differs from that of ``hvdllm`` and ``mwms``.

Keras 3's ``fit`` does not run under MultiWorkerMirroredStrategy at 2
workers as shipped (keras-team/keras#20585); the ``mwms`` side carries the
two smallest fixes that make it run, see :func:`_fix_keras_for_multi_worker`.

``keras.distribution.DataParallel`` is not a peer here: with the TensorFlow
backend Keras 3 has no multi-process ``keras.distribution.initialize`` and
its TensorFlow distribution code is a stub, so only JAX runs it across
processes.

Every process gets 1 intra-op and 2 inter-op threads (2 cores, 2 ranks).
Rank ``r`` trains on rows ``[r * b, (r + 1) * b)`` of each global batch of
``2 * b`` rows, so the two sides compute the very same steps and must end
at the same loss (checked, printed).  A step's time is the interval between
``on_train_batch_end`` calls, the warm-up steps (5) dropped; a launch's
figure is its slowest rank's median; a side's figure is the median over
rounds, whose order alternates.  Exits non-zero if a side fails or the two
2-rank sides end at different losses, not on a missed target.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Model and data of a full run: about 3.4M parameters (13.7 MB of fp32 gradients).
FULL = {"d_in": 256, "hidden": 1024, "layers": 4, "classes": 10, "batch": 64,
        "warmup": 5, "steps": 30, "lr": 1e-3, "seed": 1234, "eval_rows": 512}
QUICK = dict(FULL, hidden=128, layers=2, batch=16, warmup=2, steps=5)
SIDES = {"hvdllm": ("hvdllm", 2), "mwms": ("mwms", 2), "plain_1": ("plain", 1)}
DIAGNOSE_SIDES = {"hvdllm_1": ("hvdllm", 1), "mwms_1": ("mwms", 1), "plain_2": ("plain", 2),
                  "sync": ("sync", 2)}
INTRA_THREADS, INTER_THREADS = 1, 2
LAUNCH_TIMEOUT_SEC = 300.0
LOSS_RTOL = 1e-3


class SideError(RuntimeError):
    """A side failed or ran past its deadline."""


# -- worker: one process of one side ---------------------------------------------

def build_model(settings: dict, hvd=None):
    """The benchmark's MLP, compiled with Adam (made distributed when ``hvd`` is given)."""
    import keras

    s = settings
    keras.utils.set_random_seed(s["seed"])
    model = keras.Sequential(
        [keras.Input((s["d_in"],))]
        + [keras.layers.Dense(s["hidden"], activation="relu") for _ in range(s["layers"])]
        + [keras.layers.Dense(s["classes"])])
    optimizer = keras.optimizers.Adam(learning_rate=s["lr"])
    if hvd is not None:
        optimizer = hvd.DistributedOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def worker(settings: dict) -> None:
    kind = settings["kind"]
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(INTRA_THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(INTER_THREADS)
    import keras
    import numpy as np

    strategy = hvd = None
    if kind == "mwms":  # created first, before any other TensorFlow op
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        rank, world = strategy.cluster_resolver.task_id or 0, strategy.num_replicas_in_sync
    elif kind in ("hvdllm", "sync"):
        import hvdllm.tensorflow.keras as hvd

        hvd.init()
        rank, world = hvd.rank(), hvd.size()
        if kind == "sync":
            return sync_parts(settings, hvd)
    else:
        # plain_2 runs two of these at once (under mpirun, which sets the rank), apart.
        rank, world = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")), 1

    s = settings
    b, total = s["batch"], s["warmup"] + s["steps"]
    rng = np.random.default_rng(s["seed"])
    teacher = rng.standard_normal((s["d_in"], s["classes"])).astype(np.float32)
    x = rng.standard_normal((total * 2 * b + s["eval_rows"], s["d_in"])).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    x_eval, y_eval = x[-s["eval_rows"]:], y[-s["eval_rows"]:]

    def shard(r: int) -> tf.data.Dataset:
        """Rank ``r``'s rows of every global batch of ``2 * b`` rows, in batches of ``b``."""
        rows = (np.arange(total)[:, None] * 2 * b + r * b + np.arange(b)).reshape(-1)
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(b)

    class StepClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.ends.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    callbacks: list = [clock]
    if strategy is not None:
        with strategy.scope():
            model = build_model(settings, hvd)
        _fix_keras_for_multi_worker(model, strategy)
        data = strategy.distribute_datasets_from_function(
            lambda ctx: shard(ctx.input_pipeline_id))
    else:
        model = build_model(settings, hvd)
        data = shard(rank)
        if hvd is not None:
            callbacks.append(hvd.callbacks.BroadcastGlobalVariablesCallback(0))
    model.fit(data, epochs=1, steps_per_epoch=total, callbacks=callbacks, verbose=0)
    times = [b_ - a for a, b_ in zip(clock.ends[:-1], clock.ends[1:])][s["warmup"]:]
    logits = model(x_eval, training=False)
    loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
        y_eval, logits, from_logits=True)))
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    print(json.dumps({"rank": rank, "world": world, "median": statistics.median(times),
                      "times": times, "eval_loss": loss, "params": params}), flush=True)


def _fix_keras_for_multi_worker(model, strategy) -> None:
    """Work around Keras 3's ``fit`` failing under MultiWorkerMirroredStrategy at > 1 worker.

    Keras 3.15 (keras-team/keras#20585, open) fails twice there: building
    the model from its first batch reduces a tuple of per-replica values
    (``strategy.reduce`` takes one), and the per-step logs are averaged
    over workers with ``axis=0`` on scalars.  Here the first batch is taken
    from the local replica, and the logs are the local replica's (no
    communication, as on hvdllm's side, whose logs stay local too).
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    def symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build
    reduce = trainer.reduce_per_replica
    trainer.reduce_per_replica = lambda values, strat, reduction: reduce(values, strat, "first")


def sync_parts(settings: dict, hvd) -> None:
    """Time the pieces of one gradient sync at 2 ranks, on the model's gradient shapes.

    ``mpi``: one mpi4py ``Allreduce`` (in place) of all values in one buffer;
    ``hvd_flat``: Horovod's allreduce of that buffer as one tensor, in a
    ``tf.function``; ``hvd_grouped``: Horovod's ``grouped_allreduce`` of the
    gradients as they are; ``hvdllm``: the reduction the
    ``DistributedOptimizer`` runs in ``apply``; ``concat_split``: that
    reduction's flattening and splitting alone, no communication.  The
    pieces alternate within each repetition; each figure is a median.
    """
    import horovod.tensorflow as horovod
    import numpy as np
    import tensorflow as tf
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    model = build_model(settings, hvd)
    variables = list(model.trainable_variables)
    grads = [tf.random.normal(v.shape) for v in variables]
    sizes = [int(np.prod(v.shape)) for v in variables]
    flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    buf = flat.numpy()
    reducer = model.optimizer._hvdllm_reducer  # the one apply() uses

    def concat_split(gs):
        parts = tf.split(tf.concat([tf.reshape(g, [-1]) for g in gs], axis=0), sizes)
        return [tf.reshape(p, g.shape) for p, g in zip(parts, gs)]

    hvd_flat = tf.function(lambda x: horovod.allreduce(x, op=horovod.Average))
    hvd_grouped = tf.function(lambda gs: horovod.grouped_allreduce(gs, op=horovod.Average))
    hvdllm = tf.function(lambda gs: reducer.reduce(variables, gs))
    split = tf.function(concat_split)
    parts = {
        "mpi": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
        "hvd_flat": lambda: hvd_flat(flat),
        "hvd_grouped": lambda: hvd_grouped(grads),
        "hvdllm": lambda: hvdllm(grads),
        "concat_split": lambda: split(grads),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(settings["warmup"] + settings["steps"]):
        for name, fn in parts.items():
            comm.Barrier()
            start = time.perf_counter()
            fn()
            if i >= settings["warmup"]:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({"rank": comm.Get_rank(), "world": comm.Get_size(), "median": med["hvdllm"],
                      "parts": med, "eval_loss": float("nan"), "params": sum(sizes)}),
          flush=True)


# -- launcher ----------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(INTRA_THREADS), PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel reports free (held together, then released)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))  # all interfaces, as TensorFlow's gRPC server binds
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _kill(proc: subprocess.Popen) -> None:
    """End ``proc``'s process group (started as its own group leader)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_procs(cmds: list[tuple[list[str], dict[str, str]]], timeout: float
               ) -> list[tuple[int, str, str]]:
    """Start every command at once; wait for all within ``timeout``; kill all on any failure.

    Returns ``(exit status, stdout, stderr)`` per command.  Output goes to
    files, so a chatty process cannot block on a full pipe.
    """
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cmds]
    procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO,
                              start_new_session=True)
             for (cmd, env), (out, err) in zip(cmds, files)]
    deadline = time.monotonic() + timeout
    problem = ""
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                problem = "a process failed"  # its peers would wait for it until the deadline
                break
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout:g}s"
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
    results = []
    for proc, (out, err) in zip(procs, files):
        out.seek(0)
        err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
        out.close()
        err.close()
    if problem or any(rc != 0 for rc, _, _ in results):
        raise SideError("\n".join([problem] + [f"exit {rc}\n{out[-1500:]}\n{err[-3000:]}"
                                               for rc, out, err in results if rc != 0]))
    return results


def _records(outputs: list[str]) -> list[dict]:
    return [json.loads(ln) for out in outputs for ln in out.splitlines() if ln.startswith("{")]


def run_side(name: str, settings: dict, sides: dict) -> dict:
    """One launch of side ``name``: the slowest rank's median step time and rank 0's loss."""
    kind, world = sides[name]
    payload = json.dumps(dict(settings, kind=kind))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
    env = _env()
    for attempt in (1, 2):
        if kind in ("hvdllm", "sync") or kind == "plain" and world > 1:
            mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
            cmds = [([mpirun, "-np", str(world), "--oversubscribe", "--bind-to", "none"] + cmd,
                     env)]
        elif kind == "mwms" and world > 1:
            hosts = [f"127.0.0.1:{port}" for port in _free_ports(world)]
            cmds = [(cmd, dict(env, TF_CONFIG=json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})))
                for i in range(world)]
        else:
            cmds = [(cmd, env)]
        try:
            results = _run_procs(cmds, LAUNCH_TIMEOUT_SEC)
            break
        except SideError as exc:
            # A port picked free can be taken before the worker binds it: retry once.
            if attempt == 1 and kind == "mwms" and any(
                    m in str(exc) for m in ("Could not start gRPC server", "ddress already in use")):
                print(f"  {name}: a port was taken, retrying with new ports", flush=True)
                continue
            raise SideError(f"side {name} failed: {exc}") from None
    recs = _records([out for _, out, _ in results])
    if len(recs) != world or len({r["rank"] for r in recs}) != world:
        raise SideError(f"side {name}: {len(recs)} of {world} ranks reported\n"
                        f"{results[0][1][-1500:]}\n{results[0][2][-3000:]}")
    losses = [r["eval_loss"] for r in recs]
    extra = {"parts": {k: max(r["parts"][k] for r in recs) for k in recs[0]["parts"]}
             } if "parts" in recs[0] else {}
    return {**extra, "median": max(r["median"] for r in recs),
            "loss": next(r["eval_loss"] for r in recs if r["rank"] == 0),
            "loss_spread": max(losses) - min(losses), "params": recs[0]["params"]}


def main() -> int | None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, help=f"timed steps per launch (default {FULL['steps']})")
    ap.add_argument("--diagnose", action="store_true",
                    help="add hvdllm_1, mwms_1 (one rank each), plain_2 (two plain "
                    "processes at once) and sync (the pieces of one gradient sync)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, a smoke test")
    args = ap.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.steps:
        settings["steps"] = args.steps
    sides = dict(SIDES, **(DIAGNOSE_SIDES if args.diagnose else {}))
    names = list(sides)
    runs: dict[str, list[dict]] = {s: [] for s in names}
    try:
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                res = run_side(name, settings, sides)
                runs[name].append(res)
                what = ("ms, " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in res["parts"].items())
                        if "parts" in res else f"ms/step  eval loss {res['loss']:.5f}")
                print(f"round {r + 1}: {name:<9} {res['median'] * 1e3:8.1f} {what}", flush=True)
    except SideError as exc:
        print(exc, file=sys.stderr)
        return 1
    med = {s: statistics.median(x["median"] for x in v) for s, v in runs.items()}
    loss = {s: v[-1]["loss"] for s, v in runs.items()}
    print(f"\nMLP {settings['d_in']}-{settings['hidden']}x{settings['layers']}-"
          f"{settings['classes']} ({runs['hvdllm'][0]['params'] / 1e6:.2f}M parameters), "
          f"fp32 Adam, global batch {2 * settings['batch']} ({settings['batch']} per rank), "
          f"median over {args.rounds} rounds of each launch's median over {settings['steps']} "
          f"steps ({settings['warmup']} warm-up steps dropped)")
    print(f"  {'side':<9} {'step':>9} {'over plain_1':>13}  eval loss after "
          f"{settings['warmup'] + settings['steps']} steps")
    for s in names:
        if sides[s][0] == "sync":
            print(f"  {s:<9} the pieces of one gradient sync of {runs[s][0]['params']} float32, "
                  f"alone:")
            for part in runs[s][0]["parts"]:
                ms = statistics.median(x["parts"][part] for x in runs[s]) * 1e3
                print(f"    {part:<13} {ms:7.1f} ms")
            continue
        print(f"  {s:<9} {med[s] * 1e3:7.1f} ms {(med[s] - med['plain_1']) * 1e3:+10.1f} ms  "
              f"{loss[s]:.5f}")
    ratio = med["hvdllm"] / med["mwms"]
    print(f"hvdllm / mwms step time at 2 ranks: {ratio:.3f} (target <= 1.0: "
          f"{'PASS' if ratio <= 1.0 else 'MISS'})")
    diff = abs(loss["hvdllm"] - loss["mwms"]) / abs(loss["mwms"])
    spread = max(x["loss_spread"] for s in ("hvdllm", "mwms") for x in runs[s])
    print(f"eval loss hvdllm {loss['hvdllm']:.5f} vs mwms {loss['mwms']:.5f} (relative "
          f"difference {diff:.1e}, {'same' if diff <= LOSS_RTOL else 'DIFFERENT'} within "
          f"{LOSS_RTOL:g}); largest spread between ranks of one launch {spread:.1e}")
    return 0 if diff <= LOSS_RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
