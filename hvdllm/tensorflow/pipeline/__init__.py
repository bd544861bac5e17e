"""Pipeline parallelism for the Keras 3 reference models.

* :mod:`.stage`: cut a model into this rank's chunks and run one chunk;
* :mod:`.p2p`: tensors between stages, non-blocking, with agreed shapes;
* :mod:`.executor`: walk a schedule's action list for one training step;
* :mod:`.profile`: measure per-layer cost for ``partition = "balanced"``;
* :mod:`.build`: choose the split and build a stage's executor.

The schedules, the walk over them, the message framing and the split
arithmetic are framework-free and shared with the torch adapter:
:mod:`hvdllm.common.schedules`, :mod:`hvdllm.common.stage_walk`,
:mod:`hvdllm.common.p2p` and :mod:`hvdllm.common.partition`.
"""
from .build import PipelineSplit, build_pipeline, plan_split
from .executor import PipelinedLM, PipelineExecutor
from .p2p import PipelineCommError, StageLink, TensorSpec
from .profile import profile_layer_costs
from .stage import (Chunk, ModelPieces, cut_stage, model_pieces, parameter_costs, run_chunk,
                    tied_embedding)

__all__ = [
    "Chunk", "ModelPieces", "PipelineCommError", "PipelineExecutor", "PipelineSplit",
    "PipelinedLM", "StageLink", "TensorSpec", "build_pipeline", "cut_stage", "model_pieces",
    "parameter_costs", "plan_split", "profile_layer_costs", "run_chunk", "tied_embedding",
]
