"""Pipeline parallelism for the PyTorch reference models.

* :mod:`.stage`: cut a model into this rank's chunks and run one chunk;
* :mod:`.p2p`: tensors between stages, non-blocking, with agreed shapes;
* :mod:`.executor`: walk a schedule's action list for one training step;
* :mod:`.profile`: measure per-layer cost for ``partition = "balanced"``;
* :mod:`.build`: choose the split and build a stage's executor;
* :mod:`.memory`: measure the activation memory autograd keeps.

The schedules themselves and the split arithmetic are framework-free, in
:mod:`hvdllm.common.schedules` and :mod:`hvdllm.common.partition`.
"""
from .build import PipelineSplit, build_pipeline, plan_split
from .executor import PipelineExecutor
from .memory import SavedTensorMeter
from .p2p import PipelineCommError, StageLink, TensorSpec
from .profile import profile_layer_costs
from .stage import Chunk, cut_stage, parameter_costs, run_chunk, tied_embedding

__all__ = [
    "Chunk", "PipelineCommError", "PipelineExecutor", "PipelineSplit", "SavedTensorMeter",
    "StageLink", "TensorSpec", "build_pipeline", "cut_stage",
    "parameter_costs", "plan_split", "profile_layer_costs", "run_chunk", "tied_embedding",
]
