"""Measure forward plus backward time of each piece of a model, for ``partition = "balanced"``.

The measurement runs once at start-up on one rank (the others wait for its
result, so every rank cuts the same split).  It uses the full dense model
before tensor parallelism, one micro-batch of random tokens, and the median
of a few timed repetitions per piece.  The global random state is restored
afterwards, so dropout masks of the training run do not depend on it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ...common.partition import LayerCosts
from ..models import CausalLM


def _median_time(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_layer_costs(model: CausalLM, micro_batch_size: int, seq_len: int,
                        repeats: int = 5) -> LayerCosts:
    """Seconds of forward + backward of the embedding, each block and head + loss.

    Args:
        model: the full model (every block, embedding and head present).
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        repeats: timed repetitions per piece (after one warm-up).
    """
    vocab = model.criterion.vocab_size
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=gen)
    targets = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=gen)
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            hidden = model.embed(idx)
        grad = torch.randn(hidden.shape, generator=gen, dtype=hidden.dtype)

        def embedding() -> None:
            torch.autograd.backward(model.embed(idx), grad)

        def block(key: str) -> Callable[[], None]:
            def run() -> None:
                x = hidden.detach().requires_grad_()
                torch.autograd.backward(model.run_block(key, x), grad)
            return run

        def head() -> None:
            x = hidden.detach().requires_grad_()
            model.criterion(model.head(x), targets).backward()

        layers = tuple(_median_time(block(key), repeats) for key in model.blocks)
        costs = LayerCosts(layers, _median_time(embedding, repeats), _median_time(head, repeats))
    model.zero_grad(set_to_none=True)
    return costs
