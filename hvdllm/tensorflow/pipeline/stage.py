"""Cut a Keras model into this rank's pipeline chunks, and run one chunk.

The model is cut in place: the blocks this rank does not own leave
``model.blocks``, the layers of the embedding leave every rank but the
first stage's and those of the head every rank but the last's.  What
remains keeps its variable paths (``gpt/block_5/attn/qkv/kernel`` is still
called that on the stage that owns layer 5), so the optimizer, data-parallel
sync and checkpoints address the same names as without pipelining, and
``model.trainable_variables`` is this stage's.

Which layers belong to the embedding and to the head is read off the model
itself: :func:`model_pieces` traces ``model.embed`` and ``model.head`` and
looks at the variables each graph reads.  So the cut knows no family (and
no tensor-parallel layer), only the :class:`~hvdllm.tensorflow.models.CausalLM`
contract.

GPT ties its output head to the token embedding.  With ``pp > 1`` the
first stage and the last both keep the token-embedding layer: two copies of
one weight, kept equal by summing their gradients across the two stages
(:meth:`~hvdllm.tensorflow.pipeline.executor.PipelineExecutor.reduce_tied_grads`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import keras
import tensorflow as tf

from ...common.partition import LayerCosts, chunk_layers
from ...common.schedules import global_chunk_index
from ..models import CausalLM


@dataclass(frozen=True)
class Chunk:
    """One model chunk held by this rank.

    Attributes:
        index: global chunk index (position in the model).
        keys: names of its blocks in ``model.blocks``, in order.
        first: it runs the embedding (global chunk 0).
        last: it runs the final norm, head and loss (the last global chunk).
    """

    index: int
    keys: tuple[str, ...]
    first: bool
    last: bool


@dataclass(frozen=True)
class ModelPieces:
    """The variables ``model.embed`` and ``model.head`` read (trainable or not), by path.

    Attributes:
        embedding: paths of the variables of the embedding.
        head: paths of the variables of the final norm and head.
    """

    embedding: frozenset[str]
    head: frozenset[str]

    @property
    def tied(self) -> frozenset[str]:
        """Variables both read (GPT's token embedding is its output head)."""
        return self.embedding & self.head


def _check(model: Any) -> CausalLM:
    if not isinstance(model, CausalLM):
        raise TypeError(f"no pipeline layout for {type(model).__name__}; expected a CausalLM "
                        f"(GPT or Llama)")
    return model


def model_pieces(model: CausalLM) -> ModelPieces:
    """Trace the embedding and the head of the whole model; name the variables they read."""
    _check(model)
    by_id = {id(v.value): v.path for v in model.variables}

    def paths(graph_fn: Any) -> frozenset[str]:
        return frozenset(by_id[id(v)] for v in graph_fn.variables if id(v) in by_id)

    embed = tf.function(lambda idx: model.embed(idx, training=True), autograph=False)
    embed_graph = embed.get_concrete_function(tf.TensorSpec((1, model.seq_len), tf.int64))
    hidden = embed_graph.structured_outputs
    head = tf.function(model.head, autograph=False)
    head_graph = head.get_concrete_function(tf.TensorSpec(hidden.shape, hidden.dtype))
    return ModelPieces(paths(embed_graph), paths(head_graph))


def _layer_paths(layer: keras.Layer) -> set[str]:
    return {v.path for v in layer.variables}


def tied_embedding(model: CausalLM) -> bool:
    """True when the output head reads the token embedding's weight."""
    return bool(model_pieces(model).tied)


def parameter_costs(model: CausalLM, pieces: ModelPieces | None = None) -> LayerCosts:
    """Parameter counts of each block, the embedding and the head (a tied weight counts twice).

    Args:
        model: the full model, before any cut.
        pieces: from :func:`model_pieces` (traced here if not given).
    """
    pieces = pieces or model_pieces(model)

    def count(variables: Sequence[Any]) -> float:
        return float(sum(math.prod(v.shape) for v in variables))

    layers = tuple(count(block.trainable_variables) for block in model.blocks)
    embedding = [v for v in model.trainable_variables if v.path in pieces.embedding]
    head = [v for v in model.trainable_variables if v.path in pieces.head]
    return LayerCosts(layers, count(embedding), count(head))


def _drop_layer(model: CausalLM, layer: keras.Layer) -> None:
    """Remove a top-level layer from ``model`` and from Keras's tracking of it."""
    tracker = model._tracker  # Keras 3 keeps sub-layers and their variables here
    locked = tracker.locked
    tracker.unlock()
    try:
        tracker.untrack(layer)
    finally:
        if locked:
            tracker.lock()
    for name, value in list(vars(model).items()):
        if value is layer:
            delattr(model, name)


def cut_stage(model: CausalLM, sizes: Sequence[int], stage: int, num_stages: int,
              pieces: ModelPieces | None = None) -> list[Chunk]:
    """Keep only ``stage``'s chunks of ``model`` (in place); return them in local order.

    Args:
        model: the full model (possibly already tensor-parallel).
        sizes: layers per global chunk (a split from :mod:`hvdllm.common.partition`).
        stage: this rank's index in the pipeline group.
        num_stages: pipeline degree ``pp``.
        pieces: from :func:`model_pieces` (traced here if not given).
    """
    _check(model)
    pieces = pieces or model_pieces(model)
    blocks = list(model.blocks)
    if sum(sizes) != len(blocks):
        raise ValueError(f"split {tuple(sizes)} covers {sum(sizes)} layers but the model has "
                         f"{len(blocks)}")
    ranges = chunk_layers(sizes)
    chunks = []
    for c in range(len(sizes) // num_stages):
        g = global_chunk_index(stage, c, num_stages)
        chunks.append(Chunk(g, tuple(blocks[i].name for i in ranges[g]), g == 0,
                            g == len(sizes) - 1))
    owned = {key for chunk in chunks for key in chunk.keys}
    first, last = any(c.first for c in chunks), any(c.last for c in chunks)
    block_ids = {id(b) for b in blocks}
    for layer in list(model.layers):
        if id(layer) in block_ids:
            continue
        paths = _layer_paths(layer)
        keep = (not paths or (first and paths & pieces.embedding)
                or (last and paths & pieces.head))
        if not keep:
            _drop_layer(model, layer)
    for block in blocks:
        if block.name not in owned:
            _drop_layer(model, block)
    model.blocks = [b for b in blocks if b.name in owned]
    return chunks


def run_chunk(model: CausalLM, chunk: Chunk, blocks: Sequence[keras.Layer], inputs: Any,
              targets: Any = None, training: bool = True) -> Any:
    """Forward one micro-batch through one chunk (traced by the executor).

    Args:
        model: the cut model of this stage.
        chunk: which of its chunks to run.
        blocks: the chunk's block layers, in order.
        inputs: token ids (b, t) for the first chunk, else the residual
            stream (b, t, d) received from the previous chunk.
        targets: next-token ids (b, t); used by the last chunk only.
        training: dropout on.

    Returns:
        The residual stream for the next chunk, or the loss (a scalar) on
        the last chunk.
    """
    x = model.embed(inputs, training=training) if chunk.first else inputs
    for block in blocks:
        x = block(x, training=training)
    if chunk.last:
        return model.criterion(model.head(x), targets)
    return x
