"""Megatron-style tensor parallelism for the PyTorch reference models.

* :mod:`.mappings`: the TP group handle and the mirror-pair autograd functions;
* :mod:`.layers`: column/row-parallel linears, vocabulary-parallel
  embedding, head and cross-entropy;
* :mod:`.parallelize`: swap a plain model's layers for their TP versions, as
  the family contract (:mod:`hvdllm.common.family`) plans.
"""
from .layers import (ColumnParallelLinear, RowParallelLinear, SequenceParallelPositionEmbedding,
                     VocabParallelCrossEntropy, VocabParallelEmbedding, VocabParallelLMHead,
                     padded_vocab_size)
from .mappings import (TensorParallelGroup, copy_to_region, gather_from_region,
                       gather_from_sequence, reduce_from_region, reduce_scatter_to_sequence,
                       scatter_to_region, scatter_to_sequence)
from .parallelize import (GPT_PLAN, LLAMA_PLAN, PLANS, family_plan, full_state_dict,
                          full_tensor, parallelize, parameter_split, replicated_parameters)

__all__ = [
    "ColumnParallelLinear", "GPT_PLAN", "LLAMA_PLAN", "PLANS", "RowParallelLinear",
    "SequenceParallelPositionEmbedding", "TensorParallelGroup", "VocabParallelCrossEntropy",
    "VocabParallelEmbedding", "VocabParallelLMHead", "copy_to_region", "family_plan",
    "full_state_dict", "full_tensor", "gather_from_region",
    "gather_from_sequence", "padded_vocab_size", "parallelize", "parameter_split",
    "reduce_from_region", "reduce_scatter_to_sequence", "replicated_parameters",
    "scatter_to_region", "scatter_to_sequence",
]
