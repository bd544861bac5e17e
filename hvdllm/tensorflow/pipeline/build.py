"""Apply pipeline parallelism to a Keras model from outside: choose a split, cut, build the executor.

Order in the engine, as for torch: build the full model, :func:`plan_split`
(which may measure the dense model), apply tensor parallelism, then
:func:`build_pipeline` cuts this rank's stage out of the (sharded) model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from ...common.config import Config
from ...common.partition import LayerCosts, describe_split, split_layers
from ...common.topology import ParallelGroups
from ..models import CausalLM
from .executor import PipelineExecutor
from .p2p import TensorSpec
from .profile import profile_layer_costs
from .stage import cut_stage, model_pieces, parameter_costs


@dataclass(frozen=True)
class PipelineSplit:
    """The layers of each global chunk, and what they were balanced on.

    Attributes:
        method: the ``parallel.partition`` used.
        sizes: layers per global chunk, in model order.
        costs: per-piece costs the split was balanced on (None for "uniform").
    """

    method: str
    sizes: tuple[int, ...]
    costs: LayerCosts | None = None

    def describe(self, num_stages: int) -> str:
        return describe_split(self.method, self.sizes, num_stages, self.costs)


def plan_split(model: CausalLM, cfg: Config, groups: ParallelGroups) -> PipelineSplit:
    """The split every rank will cut (collective over the world for "balanced").

    "balanced" measures the model on world rank 0 and broadcasts the costs,
    so that timing noise cannot give two ranks different splits.

    Args:
        model: the full dense model, before tensor parallelism.
        cfg: the run's config.
        groups: this rank's groups (the world group is used).
    """
    p, t = cfg.parallel, cfg.train
    costs = None
    if p.partition == "parameters":
        costs = parameter_costs(model)
    elif p.partition == "balanced":
        if groups.world.rank == 0:
            costs = profile_layer_costs(model, t.micro_batch_size, cfg.model.seq_len)
        costs = groups.world.broadcast_object(costs, root=0)
    sizes = split_layers(p.partition, p.pp * p.virtual_stages, len(model.blocks), costs)
    return PipelineSplit(p.partition, sizes, costs)


def build_pipeline(model: CausalLM, split: PipelineSplit, cfg: Config, groups: ParallelGroups,
                   tp: Any = None) -> PipelineExecutor:
    """Cut this rank's stage out of ``model`` (in place) and return its executor.

    Collective over the pipeline group (the stages agree on message shapes).
    The step's schedule is built here too, so a micro-batch count it cannot
    run fails at start-up, and a too small one is warned about then.

    GPT's tied embedding: the last stage keeps its own copy of the token
    embedding for the head, marked ``hvdllm_pp_duplicate`` (the first
    stage's copy is the one gradient-norm clipping and checkpoints count).

    Args:
        model: the full model, already tensor-parallel if tp > 1.
        split: from :func:`plan_split`, the same on every rank.
        cfg: the run's config.
        groups: this rank's groups; ``groups.pp`` carries the stage traffic.
        tp: the tensor-parallel group (None: no tensor parallelism); its
            sequence parallelism shortens the activations each rank sends
            to ``1 / tp.size`` of the sequence.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    stage = groups.pp.rank
    pieces = model_pieces(model)
    chunks = cut_stage(model, split.sizes, stage, p.pp, pieces)
    tied_variable = None
    first, last = any(c.first for c in chunks), any(c.last for c in chunks)
    if pieces.tied and p.pp > 1 and (first or last):
        (tied_variable,) = [v for v in model.trainable_variables if v.path in pieces.tied]
        if last:
            tied_variable.hvdllm_pp_duplicate = True
    sequence_parallel = tp is not None and tp.size > 1 and tp.sequence_parallel
    seq = m.seq_len // tp.size if sequence_parallel else m.seq_len
    spec = TensorSpec(tf.as_dtype(model.compute_dtype), (t.micro_batch_size, seq, m.d_model))
    executor = PipelineExecutor(model, chunks, groups.pp, spec, schedule=p.schedule,
                                virtual_stages=p.virtual_stages,
                                recompute=p.recompute == "full", tied_variable=tied_variable,
                                verbose=groups.rank == 0)
    executor.plan(cfg.grad_accum_steps)
    return executor
