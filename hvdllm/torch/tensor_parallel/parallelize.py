"""Apply tensor parallelism to a plain reference model from outside.

A plan maps module paths (``*`` matches one layer index) to a style.
:func:`parallelize` swaps each planned ``nn.Linear``/``nn.Embedding`` for
its tensor-parallel version, sliced from the full weights the model was
built with, and replaces the loss with the vocabulary-parallel one.
Parameter names do not change (``blocks.0.attn.qkv.weight`` is still
there, holding a shard), so optimizers, data-parallel sync and checkpoints
address the same names at every tp.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn

from ..models import GPT, CausalLM, Llama
from .layers import (ColumnParallelLinear, RowParallelLinear, SequenceParallelPositionEmbedding,
                     VocabParallelCrossEntropy, VocabParallelEmbedding, VocabParallelLMHead)
from .mappings import TensorParallelGroup

Style = Callable[[nn.Module, TensorParallelGroup], nn.Module]


def colwise(parts: int = 1, shared_input: bool = False) -> Style:
    """Split output rows (``parts`` fused blocks, e.g. 3 for q, k, v).

    ``shared_input``: consecutive layers fed the same tensor share one input
    collective each way.
    """
    return lambda m, tp: ColumnParallelLinear.from_dense(m, tp, parts=parts,
                                                         shared_input=shared_input)


def rowwise(m: nn.Module, tp: TensorParallelGroup) -> nn.Module:
    """Split input columns; sum the partial outputs."""
    return RowParallelLinear.from_dense(m, tp)


def vocab_embedding(m: nn.Module, tp: TensorParallelGroup) -> nn.Module:
    return VocabParallelEmbedding.from_dense(m, tp)


def vocab_head(m: nn.Module, tp: TensorParallelGroup) -> nn.Module:
    return VocabParallelLMHead.from_dense(m, tp)


def sequence_positions(m: nn.Module, tp: TensorParallelGroup) -> nn.Module:
    return SequenceParallelPositionEmbedding.from_dense(m, tp)


GPT_PLAN: dict[str, Style] = {
    "wte": vocab_embedding,
    "wpe": sequence_positions,
    "blocks.*.attn.qkv": colwise(parts=3),
    "blocks.*.attn.proj": rowwise,
    "blocks.*.mlp.fc": colwise(),
    "blocks.*.mlp.proj": rowwise,
    "lm_head": vocab_head,
}

LLAMA_PLAN: dict[str, Style] = {
    "tok_emb": vocab_embedding,
    "blocks.*.attn.wq": colwise(shared_input=True),
    "blocks.*.attn.wk": colwise(shared_input=True),
    "blocks.*.attn.wv": colwise(shared_input=True),
    "blocks.*.attn.wo": rowwise,
    "blocks.*.mlp.w_gate": colwise(shared_input=True),
    "blocks.*.mlp.w_up": colwise(shared_input=True),
    "blocks.*.mlp.w_down": rowwise,
    "lm_head": vocab_head,
}


def plan_for(model: nn.Module) -> dict[str, Style]:
    if isinstance(model, GPT):
        return GPT_PLAN
    if isinstance(model, Llama):
        return LLAMA_PLAN
    raise TypeError(f"no tensor-parallel plan for {type(model).__name__}")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def parallelize(model: CausalLM, tp: TensorParallelGroup,
                plan: dict[str, Style] | None = None) -> CausalLM:
    """Shard ``model`` in place over ``tp`` and return it.

    Args:
        model: a full plain GPT or Llama, initialised identically on every
            rank of the TP group (same seed, or the same checkpoint).
        tp: the tensor-parallel group; ``tp.sequence_parallel`` switches
            sequence parallelism on.
        plan: module path pattern -> style; defaults to the model family's.
    """
    if tp.size == 1:
        return model
    plan = plan or plan_for(model)
    tied = (isinstance(getattr(model, "lm_head", None), nn.Linear)
            and model.lm_head.weight is getattr(getattr(model, "wte", None), "weight", None))
    targets = [(path, style) for path, _ in model.named_modules() if path
               for pattern, style in plan.items() if fnmatch.fnmatchcase(path, pattern)]
    matched = {pattern for pattern in plan
               if any(fnmatch.fnmatchcase(path, pattern) for path, _ in targets)}
    missing = sorted(set(plan) - matched)
    if missing:
        raise ValueError(f"tensor-parallel plan entries match no module of "
                         f"{type(model).__name__}: {missing}")
    for path, style in targets:
        _set_submodule(model, path, style(model.get_submodule(path), tp))
    if tied:
        # One shard parameter serves both the embedding and the head.
        model.lm_head.weight = model.wte.weight
    model.criterion = VocabParallelCrossEntropy(model.criterion.vocab_size, tp)
    model.tensor_parallel = tp
    return model


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters every TP rank holds in full (norms, row-parallel biases, positions)."""
    return [p for p in model.parameters()
            if p.requires_grad and not getattr(p, "hvdllm_tp_sharded", False)]


def full_tensor(p: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """The full tensor of a TP shard (every rank gets it); replicated tensors pass through."""
    if not getattr(p, "hvdllm_tp_sharded", False) or tp.size == 1:
        return p.detach()
    dim, parts = p.hvdllm_tp_dim, p.hvdllm_tp_parts
    gathered = tp.all_gather(p.detach().contiguous(), dim)
    if parts > 1:  # [q0 k0 v0 q1 k1 v1] -> [q0 q1 k0 k1 v0 v1]
        pieces = [piece.chunk(parts, dim=dim) for piece in gathered.chunk(tp.size, dim=dim)]
        gathered = torch.cat([pieces[r][i] for i in range(parts) for r in range(tp.size)],
                             dim=dim)
    if p.hvdllm_tp_full_rows is not None:
        gathered = gathered.narrow(dim, 0, p.hvdllm_tp_full_rows)
    return gathered


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a (possibly TP-sharded) model as a full tensor, by name.

    Collective over the model's TP group: every rank of it must call.  Tied
    parameters appear once, under their first name.
    """
    tp = getattr(model, "tensor_parallel", None)
    out = {}
    for name, p in model.named_parameters():
        out[name] = full_tensor(p, tp) if tp is not None else p.detach()
    return out
