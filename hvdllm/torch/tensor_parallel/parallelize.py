"""Apply tensor parallelism to a plain reference model from outside.

A plan maps module paths (``*`` matches one layer index) to a style.
:func:`parallelize` swaps each planned ``nn.Linear``/``nn.Embedding`` for
its tensor-parallel version, sliced from the full weights the model was
built with, and replaces the loss with the vocabulary-parallel one.
Parameter names do not change (``blocks.0.attn.qkv.weight`` is still
there, holding a shard), so optimizers, data-parallel sync and checkpoints
address the same names at every tp.

The plans are not written here: :func:`family_plan` reads them off the
family contract (:mod:`hvdllm.common.family`), whose :class:`Split` of each
tensor is exactly what the layer chosen for it holds.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn

from ...common.family import FAMILIES, Split, TensorRule, get_family
from ..models import CausalLM
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


def _style(rule: TensorRule) -> Style | None:
    """The layer that holds ``rule``'s split (it is the first tensor of its module)."""
    if rule.role == "positions":
        return sequence_positions  # replicated, but only this rank's positions are looked up
    if rule.split == "vocab":
        return vocab_embedding if rule.role == "embedding" else vocab_head
    if rule.split == "column":
        return colwise(parts=rule.parts, shared_input=rule.shared_input)
    if rule.split == "row":
        return rowwise
    return None


def family_plan(family: str) -> dict[str, Style]:
    """Module path pattern -> style for every module a family's tensor-parallel splits touch.

    Args:
        family: "gpt" or "llama".
    """
    plan: dict[str, Style] = {}
    seen = set()
    for rule in get_family(family).rules:
        module = rule.module_pattern
        if module in seen:  # a module's first tensor (its weight) decides
            continue
        seen.add(module)
        style = _style(rule)
        if style is not None:
            plan[module] = style
    return plan


PLANS: dict[str, dict[str, Style]] = {name: family_plan(name) for name in FAMILIES}
GPT_PLAN: dict[str, Style] = PLANS["gpt"]
LLAMA_PLAN: dict[str, Style] = PLANS["llama"]


def plan_for(model: nn.Module) -> dict[str, Style]:
    """The tensor-parallel plan of ``model``'s family."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"no tensor-parallel plan for {type(model).__name__}")
    return PLANS[model.spec.family.name]


def parameter_split(p: torch.Tensor) -> Split:
    """The family-contract :class:`Split` a (possibly sharded) parameter's TP tags describe."""
    if not getattr(p, "hvdllm_tp_sharded", False):
        return Split.replicated()
    if p.hvdllm_tp_full_rows is not None:
        return Split.vocab(p.hvdllm_tp_full_rows)
    if p.hvdllm_tp_dim == 0:
        return Split.column(p.hvdllm_tp_parts)
    return Split("row", p.hvdllm_tp_dim)


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
    spec = model.spec
    problems = spec.tp_problems(tp.size)
    if problems:
        raise ValueError(f"{type(model).__name__} does not split over tp={tp.size}: "
                         + "; ".join(problems))
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
    for name, source in spec.ties.items():
        # One shard parameter serves both (GPT: the embedding and the head).
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, model.get_parameter(source))
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
