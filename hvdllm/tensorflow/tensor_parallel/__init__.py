"""Megatron-style tensor parallelism for the Keras 3 reference models.

* :mod:`.mappings`: the TP group handle and the mirror-pair
  ``tf.custom_gradient`` functions;
* :mod:`.layers`: column/row-parallel dense layers, vocabulary-parallel
  embedding, head and cross-entropy, sequence-parallel positions;
* :mod:`.parallelize`: swap a plain model's layers for their TP versions, as
  the family contract (:mod:`hvdllm.common.family`) plans.
"""
from .layers import (ColumnParallelDense, ColumnRegionInput, RowParallelDense,
                     SequenceParallelPositionEmbedding, VocabParallelCrossEntropy,
                     VocabParallelEmbedding, VocabParallelLMHead, padded_vocab_size)
from .mappings import (TensorParallelGroup, copy_to_region, gather_from_region,
                       gather_from_sequence, reduce_from_region, reduce_scatter_to_sequence,
                       scatter_to_region, scatter_to_sequence)
from .parallelize import (GPT_PLAN, LLAMA_PLAN, PLANS, family_plan, full_tensor, full_weights,
                          parallelize, replicated_variables, variable_split)

__all__ = [
    "ColumnParallelDense", "ColumnRegionInput", "GPT_PLAN", "LLAMA_PLAN", "PLANS",
    "RowParallelDense", "SequenceParallelPositionEmbedding", "TensorParallelGroup",
    "VocabParallelCrossEntropy", "VocabParallelEmbedding", "VocabParallelLMHead",
    "copy_to_region", "family_plan", "full_tensor", "full_weights", "gather_from_region",
    "gather_from_sequence", "padded_vocab_size", "parallelize", "reduce_from_region",
    "reduce_scatter_to_sequence", "replicated_variables", "scatter_to_region",
    "scatter_to_sequence", "variable_split",
]
