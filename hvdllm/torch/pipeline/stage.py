"""Cut a reference model into this rank's pipeline chunks, and run one chunk.

The model is cut in place: blocks this rank does not own are deleted from
the ``blocks`` ModuleDict, the embedding is deleted on every rank but the
first stage and the final norm and head on every rank but the last.  What
remains keeps its parameter names (``blocks.5.attn.qkv.weight`` is still
called that on the stage that owns layer 5), so optimizers, data-parallel
sync and checkpoints address the same names as without pipelining.

GPT ties its output head to the token embedding.  With ``pp > 1`` the first
stage keeps the weight as ``wte.weight`` and the last as
``lm_head.weight``: two copies of one parameter, kept equal by summing
their gradients across the two stages (see
:class:`~hvdllm.torch.pipeline.executor.PipelineExecutor`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ...common.family import EMBEDDING, HEAD, ModelSpec
from ...common.partition import LayerCosts, chunk_layers
from ...common.schedules import global_chunk_index
from ..models import CausalLM


@dataclass(frozen=True)
class Chunk:
    """One model chunk held by this rank.

    Attributes:
        index: global chunk index (position in the model).
        keys: keys of its blocks in ``model.blocks``, in order.
        first: it runs the embedding (global chunk 0).
        last: it runs the final norm, head and loss (the last global chunk).
    """

    index: int
    keys: tuple[str, ...]
    first: bool
    last: bool


def _spec(model: nn.Module) -> ModelSpec:
    if not isinstance(model, CausalLM):
        raise TypeError(f"no pipeline layout for {type(model).__name__}; expected GPT or Llama")
    return model.spec


def embedding_modules(model: CausalLM) -> tuple[str, ...]:
    """Names of the modules ``model.embed`` uses (they go on the first stage)."""
    return _spec(model).embedding_modules


def head_modules(model: CausalLM) -> tuple[str, ...]:
    """Names of the modules ``model.head`` uses (they go on the last stage)."""
    return _spec(model).head_modules


def tied_head(model: CausalLM) -> tuple[str, str] | None:
    """(head parameter, embedding parameter) names when the family ties them, else None.

    With ``pp > 1`` the first stage holds the tie under the embedding's name
    and the last under the head's.
    """
    spec = _spec(model)
    for name, source in spec.ties.items():
        if spec[name].section == HEAD and spec[source].section == EMBEDDING:
            return name, source
    return None


def tied_embedding(model: CausalLM) -> bool:
    """True when the output head shares its weight with the token embedding."""
    return tied_head(model) is not None


def parameter_costs(model: CausalLM) -> LayerCosts:
    """Parameter counts of each block, the embedding and the head (a tied weight counts twice).

    Args:
        model: the full model, before any cut.
    """
    def count(names: Sequence[str]) -> int:
        return sum(p.numel() for name in names
                   for p in model.get_submodule(name).parameters())

    layers = tuple(float(sum(p.numel() for p in block.parameters()))
                   for block in model.blocks.values())
    return LayerCosts(layers, float(count(embedding_modules(model))),
                      float(count(head_modules(model))))


def cut_stage(model: CausalLM, sizes: Sequence[int], stage: int, num_stages: int) -> list[Chunk]:
    """Keep only ``stage``'s chunks of ``model`` (in place); return them in local order.

    Args:
        model: the full model (possibly already tensor-parallel).
        sizes: layers per global chunk (a split from :mod:`hvdllm.common.partition`).
        stage: this rank's index in the pipeline group.
        num_stages: pipeline degree ``pp``.
    """
    keys = list(model.blocks.keys())
    if sum(sizes) != len(keys):
        raise ValueError(f"split {tuple(sizes)} covers {sum(sizes)} layers but the model has "
                         f"{len(keys)}")
    ranges = chunk_layers(sizes)
    num_local = len(sizes) // num_stages
    chunks = []
    for c in range(num_local):
        g = global_chunk_index(stage, c, num_stages)
        chunks.append(Chunk(g, tuple(keys[i] for i in ranges[g]), g == 0, g == len(sizes) - 1))
    owned = {key for chunk in chunks for key in chunk.keys}
    for key in keys:
        if key not in owned:
            del model.blocks[key]
    if not any(chunk.first for chunk in chunks):
        for name in embedding_modules(model):
            delattr(model, name)
    if not any(chunk.last for chunk in chunks):
        for name in head_modules(model):
            delattr(model, name)
    return chunks


def run_chunk(model: CausalLM, chunk: Chunk, inputs: torch.Tensor,
              targets: torch.Tensor | None, recompute: bool) -> torch.Tensor:
    """Forward one micro-batch through one chunk.

    Args:
        model: the cut model of this stage.
        chunk: which of its chunks to run.
        inputs: token ids (b, t) for the first chunk, else the residual
            stream (b, t, d) received from the previous chunk.
        targets: next-token ids (b, t); used by the last chunk only.
        recompute: keep only the chunk's input for backward and run its
            blocks again there (non-reentrant activation checkpointing).

    Returns:
        The residual stream for the next chunk, or the loss (a scalar) on
        the last chunk.
    """
    x = model.embed(inputs) if chunk.first else inputs
    if recompute:
        x = checkpoint(_run_blocks, model, chunk.keys, x, use_reentrant=False)
    else:
        x = _run_blocks(model, chunk.keys, x)
    if chunk.last:
        return model.criterion(model.head(x), targets)
    return x


def _run_blocks(model: CausalLM, keys: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for key in keys:
        x = model.run_block(key, x)
    return x
