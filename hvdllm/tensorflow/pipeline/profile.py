"""Measure forward plus backward time of each piece of a model, for ``partition = "balanced"``.

The measurement runs once at start-up on one rank (the others wait for its
result, so every rank cuts the same split).  It uses the full dense model
before tensor parallelism, one micro-batch of random tokens, and the median
of a few timed repetitions of each piece's traced forward-and-backward
graph.  The model's random-generator states (dropout) are restored
afterwards, so the masks of the training run do not depend on it.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from ...common.partition import LayerCosts
from ..models import CausalLM


def _median_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: the first call traces the graph
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()  # eager calls of a graph return when its outputs are ready
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward_backward(fn: Callable[..., Any], output_grad: Any = None,
                      watch_input: bool = False) -> Callable[..., Any]:
    """A traced graph: ``fn(x)`` and its gradients (input and every variable it reads)."""
    def run(x: Any) -> Any:
        with tf.GradientTape() as tape:
            if watch_input:
                tape.watch(x)
            out = fn(x)
        sources = ([x] if watch_input else []) + list(tape.watched_variables())
        return tape.gradient(out, sources, output_gradients=output_grad)

    return tf.function(run, autograph=False)


def profile_layer_costs(model: CausalLM, micro_batch_size: int, seq_len: int,
                        repeats: int = 5) -> LayerCosts:
    """Seconds of forward + backward of the embedding, each block and head + loss.

    Args:
        model: the full model (every block, embedding and head present).
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        repeats: timed repetitions per piece (after one warm-up).
    """
    rng = np.random.default_rng(0)
    idx = tf.constant(rng.integers(0, model.vocab_size, (micro_batch_size, seq_len)), tf.int64)
    targets = tf.constant(rng.integers(0, model.vocab_size, (micro_batch_size, seq_len)),
                          tf.int64)
    saved = [(v, tf.identity(v)) for v in model.non_trainable_variables]
    hidden = model.embed(idx, training=False)
    grad = tf.constant(rng.standard_normal(tuple(hidden.shape)), hidden.dtype)

    embedding = _forward_backward(lambda i: model.embed(i, training=True), grad)
    head = _forward_backward(lambda x: model.criterion(model.head(x), targets),
                             watch_input=True)
    blocks = [_forward_backward(lambda x, b=block: b(x, training=True), grad, watch_input=True)
              for block in model.blocks]
    layers = tuple(_median_time(lambda f=f: f(hidden), repeats) for f in blocks)
    costs = LayerCosts(layers, _median_time(lambda: embedding(idx), repeats),
                       _median_time(lambda: head(hidden), repeats))
    for var, value in saved:
        var.assign(value)
    return costs
