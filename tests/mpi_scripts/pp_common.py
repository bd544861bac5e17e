"""Helpers of the pipeline executor scripts: a tiny model, micro-batches, one stage.

Every rank of the job is one pipeline stage (world = pp).  The full model is
built from the same seed on every rank, so each rank can also compute the
single-process reference it is compared with.
"""
import numpy as np
import torch
from mpi4py import MPI

from hvdllm.common.failure import install_failure_handler
from hvdllm.common.partition import split_uniform
from hvdllm.common.topology import Topology, build_groups
from hvdllm.torch.models import GPT, GPTConfig, Llama, LlamaConfig
from hvdllm.torch.pipeline import PipelineExecutor, TensorSpec, cut_stage, tied_embedding

SEQ = 16
BATCH = 2
D_MODEL = 32
VOCAB = 256

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)


def setup(timeout_sec=60.0):
    """Whole-job failure handling and the pipeline group (every rank is a stage)."""
    install_failure_handler(comm)
    return build_groups(Topology(dp=1, tp=1, pp=size), comm, timeout_sec=timeout_sec)


def full_model(family, n_layer, seed=1234):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, seq_len=SEQ, n_layer=n_layer, n_head=4, d_model=D_MODEL)
    if family == "llama":
        return Llama(LlamaConfig(n_kv_head=2, d_ff=64, **common))
    return GPT(GPTConfig(**common))


def micro_batches(m, seq=SEQ, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(m, BATCH, seq + 1), dtype=np.int64)
    return [(t[:, :-1].copy(), t[:, 1:].copy()) for t in tokens]


def stage_executor(groups, family, n_layer, schedule, virtual_stages=1, recompute=False,
                   dtype=torch.float32):
    """This rank's stage of a freshly built model and its executor."""
    model = full_model(family, n_layer).to(dtype)
    tied = tied_embedding(model)
    chunks = cut_stage(model, split_uniform(n_layer, size * virtual_stages), groups.pp.rank, size)
    tied_weight = None
    if tied and chunks[0].first:
        tied_weight = model.wte.weight
    elif tied and chunks[-1].last:
        tied_weight = model.lm_head.weight
    spec = TensorSpec(dtype, (BATCH, SEQ, D_MODEL))
    executor = PipelineExecutor(model, chunks, groups.pp, spec, schedule=schedule,
                                virtual_stages=virtual_stages, recompute=recompute,
                                tied_weight=tied_weight, verbose=rank == 0)
    return model, executor


def reference_step(model, batches):
    """Single-process loss and gradients, accumulated as the engine does."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in batches:
        loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
        (loss / len(batches)).backward()
        total += loss.item()
    return total / len(batches)
