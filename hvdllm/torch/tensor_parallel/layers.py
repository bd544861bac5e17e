"""Megatron-style tensor-parallel layers, each built from a slice of a full weight.

Every layer here holds only this rank's shard and is made by a
``from_dense`` constructor that slices the full, identically initialised
weight of the plain layer it replaces, so tp=N starts from exactly the
weights of tp=1.  Sharded parameters carry ``hvdllm_tp_sharded = True``
(gradient clipping counts them per shard; everything else is replicated
over the TP group and counted once).

Under sequence parallelism the activations between layers are split along
the sequence (dim 1): column-parallel layers allgather their input
sequence first, row-parallel layers reduce-scatter their output, and the
vocabulary-parallel embedding reduce-scatters instead of allreducing.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import (TensorParallelGroup, gather_from_region, reduce_from_region,
                       reduce_scatter_to_sequence, scatter_to_region)


def mark_sharded(p: nn.Parameter, dim: int, parts: int = 1,
                 full_rows: int | None = None) -> nn.Parameter:
    """Tag ``p`` as this rank's shard along ``dim``.

    ``parts`` > 1: the dim is a concatenation of that many fused blocks,
    each split separately.  ``full_rows``: the unpadded size of ``dim``
    (vocabulary rows), when the full tensor was padded before splitting.
    :func:`hvdllm.torch.tensor_parallel.full_state_dict` uses the tags to
    reassemble full tensors.
    """
    p.hvdllm_tp_sharded = True
    p.hvdllm_tp_dim = dim
    p.hvdllm_tp_parts = parts
    p.hvdllm_tp_full_rows = full_rows
    return p


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp``."""
    return tp * math.ceil(vocab_size / tp)


def shard_rows(weight: torch.Tensor, tp: TensorParallelGroup, parts: int = 1) -> torch.Tensor:
    """This rank's rows of ``weight`` (out, ...).

    With ``parts`` > 1 the rows are a concatenation of ``parts`` equal blocks
    (fused q, k, v): each block is split and this rank's pieces are
    concatenated in the same block order.
    """
    blocks = weight.chunk(parts, dim=0)
    return torch.cat([tp.local_part(b, 0) for b in blocks], dim=0)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes its columns of y.

    Args:
        weight: this rank's rows of the full weight (out / tp, in).
        bias: this rank's part of the bias, or None.
        tp: the tensor-parallel group.
        gather_output: allgather y so every rank holds all columns; otherwise
            y stays split along its last dim (the input of a row-parallel layer).
        parts: the full rows are this many fused blocks (3 for q, k, v),
            each split separately (see :func:`shard_rows`).
        full_rows: unpadded number of full rows, if they were padded.
        shared_input: the layer is one of several consecutive layers fed the
            same tensor; they share one input collective
            (:meth:`TensorParallelGroup.enter_column_region`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallelGroup,
                 gather_output: bool = False, parts: int = 1, full_rows: int | None = None,
                 shared_input: bool = False):
        super().__init__()
        self.tp = tp
        self.gather_output = gather_output
        self.shared_input = shared_input
        self.weight = mark_sharded(nn.Parameter(weight.detach().clone()), 0, parts, full_rows)
        self.bias = None if bias is None else mark_sharded(
            nn.Parameter(bias.detach().clone()), 0, parts, full_rows)

    @classmethod
    def from_dense(cls, linear: nn.Linear, tp: TensorParallelGroup, parts: int = 1,
                   gather_output: bool = False, shared_input: bool = False
                   ) -> "ColumnParallelLinear":
        """Slice a full ``nn.Linear`` (``parts`` fused blocks of output rows)."""
        bias = None if linear.bias is None else shard_rows(linear.bias, tp, parts)
        return cls(shard_rows(linear.weight, tp, parts), bias, tp, gather_output, parts,
                   shared_input=shared_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (b, t/tp, in) under sequence parallelism, else (b, t, in) -> (b, t, in)
        x = self.tp.enter_column_region(x, shared=self.shared_input)
        y = F.linear(x, self.weight, self.bias)  # (b, t, out/tp)
        return gather_from_region(y, self.tp) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.weight.size(1)}, out_local={self.weight.size(0)}, tp={self.tp.size}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial products are summed over TP.

    Args:
        weight: this rank's columns of the full weight (out, in / tp).
        bias: the full bias (replicated), added once after the reduction.
        tp: the tensor-parallel group.
        input_is_parallel: x already holds this rank's slice of the last dim
            (the output of a column-parallel layer); otherwise it is split here.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallelGroup,
                 input_is_parallel: bool = True):
        super().__init__()
        self.tp = tp
        self.input_is_parallel = input_is_parallel
        self.weight = mark_sharded(nn.Parameter(weight.detach().clone()), 1)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, tp: TensorParallelGroup,
                   input_is_parallel: bool = True) -> "RowParallelLinear":
        weight = tp.local_part(linear.weight, 1)
        return cls(weight, linear.bias, tp, input_is_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.tp)
        y = F.linear(x, self.weight)
        if self.tp.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.tp)  # (b, t, out) -> (b, t/tp, out)
        else:
            y = reduce_from_region(y, self.tp)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_local={self.weight.size(1)}, out={self.weight.size(0)}, tp={self.tp.size}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split into contiguous row ranges.

    Ids outside this rank's range look up row 0 and are then zeroed, so the
    sum over ranks holds exactly one real row per id.

    Args:
        weight: this rank's rows (padded_vocab / tp, d).
        vocab_start: first vocabulary id this rank holds.
        tp: the tensor-parallel group.
    """

    def __init__(self, weight: torch.Tensor, vocab_start: int, tp: TensorParallelGroup,
                 vocab_size: int | None = None):
        super().__init__()
        self.tp = tp
        self.vocab_start = vocab_start
        self.vocab_end = vocab_start + weight.size(0)
        self.weight = mark_sharded(nn.Parameter(weight.detach().clone()), 0,
                                   full_rows=vocab_size)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, tp: TensorParallelGroup
                   ) -> "VocabParallelEmbedding":
        full = pad_rows(embedding.weight, padded_vocab_size(embedding.num_embeddings, tp.size))
        per_rank = full.size(0) // tp.size
        return cls(tp.local_part(full, 0), tp.rank * per_rank, tp, embedding.num_embeddings)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence(x, self.tp)
        return reduce_from_region(x, self.tp)

    def extra_repr(self) -> str:
        return f"rows=[{self.vocab_start}, {self.vocab_end}), dim={self.weight.size(1)}"


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with zero rows appended up to ``rows``."""
    extra = rows - weight.size(0)
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros((extra,) + tuple(weight.shape[1:]))], dim=0)


class SequenceParallelPositionEmbedding(nn.Module):
    """Learned positions (replicated) that return only this rank's part under sequence parallelism.

    It stands in for the plain ``nn.Embedding`` of positions, whose output
    is added to a sequence-split token embedding.
    """

    def __init__(self, weight: torch.Tensor, tp: TensorParallelGroup):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, tp: TensorParallelGroup
                   ) -> "SequenceParallelPositionEmbedding":
        return cls(embedding.weight, tp)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if self.tp.sequence_parallel:
            pos = self.tp.local_part(pos, 0)
        return F.embedding(pos, self.weight)


class VocabParallelLMHead(ColumnParallelLinear):
    """The output projection over the padded vocabulary, split by vocabulary rows.

    Its logits stay split along the vocabulary (the last dim); the loss is
    :class:`VocabParallelCrossEntropy`.  Padded rows are zero and their
    logits are masked by the loss.
    """

    @classmethod
    def from_dense(cls, linear: nn.Linear, tp: TensorParallelGroup, parts: int = 1,
                   gather_output: bool = False) -> "VocabParallelLMHead":
        full = pad_rows(linear.weight, padded_vocab_size(linear.out_features, tp.size))
        return cls(tp.local_part(full, 0), None, tp, gather_output=False,
                   full_rows=linear.out_features)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp, vocab_start, vocab_size):
        logits = logits.float()
        n_local = logits.size(-1)
        cols = torch.arange(vocab_start, vocab_start + n_local, device=logits.device)
        # Padded vocabulary entries can never be predicted.
        logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
        row_max = tp.all_reduce(logits.max(dim=-1).values, op="max")
        shifted = logits - row_max.unsqueeze(-1)
        inside = (targets >= vocab_start) & (targets < vocab_start + n_local)
        local_target = (targets - vocab_start).masked_fill(~inside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(~inside, 0.0)
        exp = shifted.exp()
        # One message for both sums: sum of exp and the target logit.
        sums = tp.all_reduce(torch.stack([exp.sum(dim=-1), target_logit]))
        sum_exp, target_logit = sums[0], sums[1]
        losses = sum_exp.log() - target_logit
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), inside, local_target)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, inside, local_target = ctx.saved_tensors
        grad = softmax
        flat = grad.view(-1, grad.size(-1))
        rows = torch.arange(flat.size(0), device=grad.device)
        flat[rows, local_target.reshape(-1)] -= inside.reshape(-1).to(grad.dtype)
        grad.mul_(grad_loss / inside.numel())
        return grad, None, None, None, None


class VocabParallelCrossEntropy(nn.Module):
    """Mean next-token cross-entropy from vocabulary-split logits.

    Max, target logit and sum of exponentials are reduced over TP; the full
    logits never exist on one rank.  Drop-in for
    :class:`hvdllm.torch.models.LMCrossEntropy`.

    Args:
        vocab_size: real (unpadded) vocabulary size.
        tp: the tensor-parallel group.
    """

    def __init__(self, vocab_size: int, tp: TensorParallelGroup):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.vocab_start = tp.rank * padded_vocab_size(vocab_size, tp.size) // tp.size

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCrossEntropy.apply(logits, targets, self.tp, self.vocab_start,
                                                self.vocab_size)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits over the whole real vocabulary."""
        return gather_from_region(logits, self.tp)[..., :self.vocab_size]
