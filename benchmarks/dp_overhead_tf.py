"""TensorFlow sides of ``dp_overhead.py``: hvdllm's engine and its plain peer.

* ``engine1``: hvdllm's engine at world size 1, op ``step``.
* ``plain1``: a textbook Keras 3 / TensorFlow loop on the same model class
  (hvdllm's Keras GPT): one ``tf.function`` with a ``GradientTape`` and
  ``optimizer.apply_gradients``, op ``step``.
* ``engine2``: hvdllm's engine at dp=2, op ``sync``: the engine's gradient
  reduction (``GradientUpdate.reduce`` from ``hvdllm/tensorflow/update.py``)
  alone, on a whole step's gradients in the form the engine's gradient
  graph hands them over, see :meth:`Engine2Side.sync`; ``sync_flat`` is a
  what-if for ``--diagnose``.

Intra-op threads come from ``hvdllm.common.launch.threads_per_rank`` on
every side.
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from dp_overhead_common import hvdllm_config, hvdllm_world, micro_batches, threads, tuning_env


class _EngineSide:
    """hvdllm's own engine, built exactly as ``hvdllm train`` builds it."""

    world = 1

    def __init__(self, settings: dict[str, Any]):
        from hvdllm.common.launch import horovod_carries_gradients
        from hvdllm.common.topology import Topology
        from hvdllm.tensorflow.distributed import init_groups
        from hvdllm.tensorflow.engine import build_engine

        comm = hvdllm_world()  # first use of MPI in this process, as in `hvdllm train`
        world = settings.get("world", self.world)  # --scaling runs this side at 4 ranks
        n_threads = threads(comm)
        cfg = hvdllm_config(settings, world, "tensorflow")
        # Horovod's cycle as `hvdllm train` sets it for this config.
        self.groups = init_groups(Topology(world), comm, 300.0,
                                  horovod_dp=horovod_carries_gradients(cfg.train, "tensorflow"))
        self.engine = build_engine(cfg, self.groups, threads=n_threads)
        self.lr = settings["lr"]
        self.batches = micro_batches(settings, comm.Get_rank())
        for _ in range(settings["setup_steps"]):
            self.step()
        self.info = {"threads": tf.config.threading.get_intra_op_parallelism_threads(),
                     "num_params": self.engine.num_params, "env": tuning_env()}
        self.ops = {"step": self.step}

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        pass

    def step(self) -> None:
        self.engine.train_step(self.batches, self.lr)

    def close(self) -> None:
        pass


class Engine1Side(_EngineSide):
    world = 1


class Engine2Side(_EngineSide):
    world = 2

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        from hvdllm.tensorflow.data_parallel import flatten_gradients

        engine = self.engine
        x, y = (tf.convert_to_tensor(a) for a in self.batches[0])
        with tf.GradientTape() as tape:
            loss = engine.model.next_token_loss(x, y, training=True)
        self.grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, engine.variables)]
        self.flat = flatten_gradients(self.grads)
        # The engine's gradient graph hands the in-place sum one flat buffer, which
        # the sum overwrites: each turn gets a fresh copy (untimed, in prepare).
        self._hand_over_flat = engine.update.in_place and engine._flat_grads
        self._grads_in = self._fresh_grads()
        for _ in range(2):  # trace
            self.sync()
            self._grads_in = self._fresh_grads()
        self.ops["sync"] = self.sync

    def _fresh_grads(self) -> Any:
        if self._hand_over_flat:
            return self.flat + 0.0  # a new buffer, as the gradient graph's output is
        return list(self.grads)

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        if op == "sync":
            self._grads_in = self._fresh_grads()

    def sync(self) -> None:
        """The engine's gradient reduction alone: ``engine.update.reduce``.

        The engine calls it after the gradient graph, on what that graph
        returns: with the in-place sum one flat float32 buffer (the graph
        already wrote the gradients so), else a list of tensors.  Here it
        runs on gradients computed once in advance, so no compute overlaps
        it; the call returns when the summed buffer is ready for the
        optimizer's graph, which cuts it into per-variable views itself (in
        the step, not here).  The 1/dp of the average costs nothing here:
        the optimizer step multiplies by it together with the unscaling.
        """
        self.engine.update.reduce(self._grads_in)


class Plain1Side:
    """A textbook ``tf.function`` training step on the same Keras model and batch."""

    world = 1

    def __init__(self, settings: dict[str, Any]):
        from hvdllm.tensorflow.models import GPT

        tf.config.threading.set_intra_op_parallelism_threads(threads())
        keras.utils.set_random_seed(settings["seed"])
        model = GPT(vocab_size=settings["vocab_size"], seq_len=settings["seq_len"],
                    n_layer=settings["n_layer"], n_head=settings["n_head"],
                    d_model=settings["d_model"], dropout=0.0)
        model.build((None, settings["seq_len"]))
        optimizer = keras.optimizers.AdamW(learning_rate=settings["lr"],
                                           weight_decay=settings["weight_decay"],
                                           beta_1=settings["beta1"], beta_2=settings["beta2"],
                                           epsilon=settings["eps"])
        optimizer.build(model.trainable_variables)

        @tf.function
        def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = model.next_token_loss(x, y, training=True)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        self.train_step = train_step
        if len(micro_batches(settings, 0)) != 1:
            raise ValueError("the plain TensorFlow loop takes one batch per step (accum = 1)")
        self.x, self.y = micro_batches(settings, 0)[0]
        for _ in range(settings["setup_steps"]):
            self.step()
        self.info = {"threads": tf.config.threading.get_intra_op_parallelism_threads()}
        self.ops = {"step": self.step}

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        pass

    def step(self) -> None:
        float(self.train_step(tf.convert_to_tensor(self.x), tf.convert_to_tensor(self.y)))

    def close(self) -> None:
        pass


SIDES = {"engine1": Engine1Side, "plain1": Plain1Side, "engine2": Engine2Side}
