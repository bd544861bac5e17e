"""Layout planner: predict every valid layout's memory and step time, rank them.

Framework-free (numpy and the config only), so ``hvdllm plan`` answers in a
second for a 512-rank world.  :func:`plan` enumerates the layouts a config
could run with on ``world`` ranks: ``dp x tp x pp``, the pipeline schedule
and its virtual stages, the micro-batch size, ZeRO-1, recomputation and
sequence parallelism.  Each candidate is checked by the config validator
itself, so the planner never proposes what ``hvdllm train`` would refuse.

**Memory** (:func:`predict_memory`), per rank, the most loaded rank:

* parameters, gradients and optimizer state from the model's logical
  tensors (:func:`~hvdllm.common.family.family_spec`), cut into pipeline
  stages like the engines cut them (uniform layer counts, embedding on the
  first stage, head on the last, GPT's tied table duplicated on the last
  stage when ``pp > 1``), sharded tensors divided by ``tp``.  Weights and
  gradients are fp32 in every precision (the master copy); AdamW keeps two
  fp32 moments, SGD one; ZeRO-1 divides the moments by ``dp`` and adds its
  flat gradient buffer and fp32 master shard.
* activations: the bytes autograd keeps per token and layer
  (:data:`ACTIVATION_FLOATS`, measured with
  :class:`~hvdllm.torch.pipeline.memory.SavedTensorMeter` for torch) times
  the tokens of the micro-batches a stage holds at its peak, which the
  schedule simulator gives (GPipe holds all ``m``, 1F1B at most ``p``).
  Full recomputation keeps one layer input per layer and rebuilds one
  layer's activations at a time; in a pipeline it keeps one chunk input
  per micro-batch in flight and rebuilds the whole chunk.  A TensorFlow
  pipeline stage holds more per micro-batch than its fused gradient graph
  does (:data:`PIPELINE_ACTIVATION_FLOATS`).  Under tensor parallelism the sharded
  regions divide by ``tp``; sequence parallelism divides the rest too.
* the head's logits and their log-probabilities on the last stage.

**Time** (:func:`predict_time`), one optimizer step:

* compute: every matmul of a micro-batch on one stage at the rate the
  calibration measured for its size (small matmuls run far below peak),
  plus per-token element-wise traffic at the measured memory bandwidth and
  a fixed cost per framework op.  Recomputation adds a forward.  A
  calibration times every rank at once with a training rank's threads, so
  its rates already carry a CPU node's sharing; ``shared_compute`` divides
  rates measured by one rank alone among the node's ranks.
* tensor parallelism: two allreduces (or reduce-scatter + all-gather pairs)
  of the layer's activations per layer in forward and two in backward,
  each also paying what the engine's collective path adds
  (``Hardware.collective_overhead``: a polled MPI wait for torch, a Horovod
  op inside the graph for TensorFlow).
* pipeline: the per-micro-batch sends and receives (each through the polled
  wait, ``Hardware.wait_overhead``), the cost of driving each (micro-batch,
  chunk) from Python (``Hardware.action_overhead``), and the bubble
  ``(p - 1) / (v * m)`` of the stage work.
* data parallelism: a ring allreduce of the stage's gradients, partly
  hidden behind the last backward (``Hardware.dp_overlap``), and the optimizer update at memory bandwidth.

Compute is multiplied by ``Hardware.compute_factor`` (and in a pipeline by
``Hardware.pipeline_factor``), and under tensor parallelism
``collective_overhead`` (``sp_collective_overhead``) is the per-collective
cost the calibration's training trials fit (:mod:`hvdllm.common.plan_trials`).

Links: a group whose ranks all sit on one node (``ranks_per_node``
consecutive ranks) uses the intra-node link, otherwise the inter-node one.
Hardware comes from :func:`calibrate` (this machine, measured) or from a
preset (:data:`PRESETS`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError
from .family import BLOCK, EMBEDDING, HEAD, family_spec
from .partition import split_uniform

GB = 1024 ** 3

#: Activation floats autograd keeps per token and transformer layer, as
#: ``(per d_model, per d_ff, per kv width, per head, per head x seq_len, constant)``.
#: torch: measured with SavedTensorMeter (SDPA keeps one log-sum-exp per head;
#: LayerNorm two statistics, RMSNorm one; tests/test_planner.py checks it).
#: Grouped-query keys and values are repeated to every head before attention,
#: so they count at full width.  TensorFlow: least-squares fits to the CPU
#: allocator's peak over six model shapes (benchmarks/plan_activation_fit.py,
#: within 10% of each): its gradient graph frees what grappler finds dead, so
#: the figures are what is live at the peak, not what the forward made; its
#: written-out attention keeps one and a half to two and a half floats per
#: head per key position, and GPT's tanh GELU several d_ff intermediates.
ACTIVATION_FLOATS: dict[tuple[str, str], tuple[float, float, float, float, float, float]] = {
    ("torch", "gpt"): (8, 2, 0, 1, 0, 4),
    ("torch", "llama"): (10, 4, 0, 1, 0, 2),
    ("tensorflow", "gpt"): (4, 7, 0, 0, 1.5, 4),
    ("tensorflow", "llama"): (8, 4, 0, 0, 2.4, 2),
}
#: What a TensorFlow pipeline stage holds per (micro-batch, layer) in flight:
#: the intermediates its forward graph outputs for the tape (all the gradient
#: graph will read, with no pruning across the function boundary), fitted
#: the same way with ``--pipeline``.  torch's autograd keeps the same either way.
PIPELINE_ACTIVATION_FLOATS: dict[tuple[str, str], tuple[float, ...]] = {
    **ACTIVATION_FLOATS,
    ("tensorflow", "gpt"): (8, 8.5, 0, 0, 2.5, 4),
    ("tensorflow", "llama"): (10, 5, 0, 0, 3, 2),
}
#: Of the d_model-sized floats above, those outside the tensor-parallel
#: regions (norm inputs and outputs): replicated on every tp rank unless
#: sequence parallelism splits them.
REPLICATED_FLOATS = {"gpt": 4, "llama": 4}
#: Framework ops per layer, forward (backward is about twice).
OPS_PER_LAYER = {"torch": 18, "tensorflow": 14}


@dataclass(frozen=True)
class Hardware:
    """What the time and memory models need to know about the machine.

    Attributes:
        name: where the figures came from ("calibrated on HOST", a preset).
        matmul: ``(flops of one matmul, FLOP/s it ran at)`` pairs, ascending;
            rates in between are interpolated in log space, beyond the ends
            held flat.
        mem_bw: bytes/s of element-wise work on tensors larger than the caches.
        op_overhead: seconds of framework cost per op.
        intra_bw, intra_latency: allreduce bus bandwidth (bytes/s) and
            per-message latency (s) within a node.
        inter_bw, inter_latency: the same across nodes.
        p2p_bw, p2p_latency: a point-to-point send within a node.
        memory: bytes each rank may use (0 = unknown, nothing is dropped).
        ranks_per_node: ranks that share a node.
        shared_compute: the rates were measured by one rank alone and ranks
            on a node share its compute (CPU): they divide among them.
            False for a calibration, which measures all ranks at once.
        mem_curve: ``(bytes of one tensor, bytes/s)`` of element-wise work,
            ascending (calibrated; empty: :attr:`mem_bw` at every size).
        wait_overhead: seconds a polled MPI wait (the engines' point-to-point
            path) adds to a message beyond the link's latency.
        collective_overhead: seconds the engine's tensor-parallel collective
            (torch: polled MPI; TensorFlow: Horovod inside the graph) adds
            beyond the link's latency.
        action_overhead: seconds of driving one pipeline (micro-batch, chunk)
            forward and backward beyond its compute (Python, graph calls,
            the tape).
        sp_collective_overhead: :attr:`collective_overhead` under sequence
            parallelism (None: the same).
        compute_factor: a real step's compute over the formulas' (fitted
            by the calibration's data-parallel trial,
            :mod:`hvdllm.common.plan_trials`; 1 for presets).
        pipeline_factor: a pipeline stage's compute over a fused step's for
            the same work (the pipeline trial; 1 for presets).
        overhead: bytes per rank the framework and runtime take before the
            model (added to every prediction's total).
        dp_overlap: the most of the data-parallel allreduce the last
            backward can hide (0.5 measured on a CPU node, where both compete
            for the cores; GPUs hide nearly all of it).
    """

    name: str
    matmul: tuple[tuple[float, float], ...]
    mem_bw: float
    op_overhead: float
    intra_bw: float
    intra_latency: float
    inter_bw: float
    inter_latency: float
    p2p_bw: float
    p2p_latency: float
    memory: float = 0.0
    ranks_per_node: int = 8
    shared_compute: bool = False
    overhead: float = 0.0
    dp_overlap: float = 0.5
    mem_curve: tuple[tuple[float, float], ...] = ()
    wait_overhead: float = 0.0
    collective_overhead: float = 0.0
    action_overhead: float = 0.0
    sp_collective_overhead: float | None = None
    compute_factor: float = 1.0
    pipeline_factor: float = 1.0

    def mem_rate(self, nbytes: float) -> float:
        """Bytes/s of element-wise work on tensors of ``nbytes``: tensors that stay
        in a core's cache move faster than :attr:`mem_bw`, the rate from memory."""
        pts = self.mem_curve
        if not pts:
            return self.mem_bw
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (b0, r0), (b1, r1) in zip(pts, pts[1:]):
            if nbytes <= b1:
                w = math.log(nbytes / b0) / math.log(b1 / b0)
                return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
        return pts[-1][1]

    def rate(self, flops: float) -> float:
        """FLOP/s of one matmul of ``flops`` floating-point operations."""
        pts = self.matmul
        if flops <= pts[0][0]:
            return pts[0][1] * flops / pts[0][0] if flops > 0 else pts[0][1]
        for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
            if flops <= f1:
                w = math.log(flops / f0) / math.log(f1 / f0)
                return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
        return pts[-1][1]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["matmul"] = [list(p) for p in self.matmul]
        out["mem_curve"] = [list(p) for p in self.mem_curve]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Hardware":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"calibration file has unknown keys {unknown}")
        values = dict(data)
        values["matmul"] = tuple((float(f), float(r)) for f, r in data["matmul"])
        values["mem_curve"] = tuple((float(b), float(r)) for b, r in data.get("mem_curve", ()))
        return cls(**values)


def _gpu_preset(name: str, peak: float, memory_gb: float, nvlink_bw: float,
                network_gbit: float) -> Hardware:
    # Matmuls reach ~60% of the dense peak when large, far less when small.
    curve = ((1e6, peak * 0.002), (1e8, peak * 0.1), (1e10, peak * 0.45), (1e12, peak * 0.6))
    return Hardware(name=name, matmul=curve, mem_bw=1.5e12, op_overhead=8e-6,
                    intra_bw=nvlink_bw, intra_latency=10e-6,
                    inter_bw=network_gbit / 8 * 1e9 * 0.9, inter_latency=20e-6,
                    p2p_bw=nvlink_bw, p2p_latency=10e-6,
                    memory=memory_gb * GB, ranks_per_node=8, shared_compute=False,
                    overhead=3 * GB, dp_overlap=0.9)


#: Hardware presets for planning clusters that are not at hand.
PRESETS: dict[str, Hardware] = {
    # 8 x A100 80 GB per node, NVLink (~230 GB/s allreduce bus bandwidth),
    # one 200 Gb/s link per GPU across nodes.
    "a100-80g": _gpu_preset("a100-80g: 312 TFLOP/s bf16, 80 GB, NVLink, 200 Gb/s",
                            312e12, 80, 230e9, 200),
    "h100-80g": _gpu_preset("h100-80g: 989 TFLOP/s bf16, 80 GB, NVLink, 400 Gb/s",
                            989e12, 80, 360e9, 400),
}


@dataclass(frozen=True)
class Layout:
    """One candidate: the settings :func:`plan` varies."""

    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False

    def overrides(self) -> list[str]:
        """``--set`` items that select this layout."""
        sets = [f"parallel.dp={self.dp}", f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
                f"train.micro_batch_size={self.micro_batch_size}"]
        if self.pp > 1:
            sets.append(f'parallel.schedule="{self.schedule}"')
            if self.virtual_stages > 1:
                sets.append(f"parallel.virtual_stages={self.virtual_stages}")
        sets.append(f"train.zero={self.zero}")
        sets.append(f'parallel.recompute="{self.recompute}"')
        if self.tp > 1:
            sets.append(f"parallel.sequence_parallel={'true' if self.sequence_parallel else 'false'}")
        return sets

    def short(self) -> str:
        text = f"dp{self.dp} tp{self.tp} pp{self.pp} mbs{self.micro_batch_size}"
        if self.pp > 1:
            text += f" {self.schedule}" + (f"/v{self.virtual_stages}" if self.virtual_stages > 1 else "")
        if self.zero:
            text += " zero1"
        if self.recompute != "none":
            text += " recompute"
        if self.sequence_parallel:
            text += " sp"
        return text


@dataclass(frozen=True)
class Memory:
    """Predicted bytes on the most loaded rank."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def model(self) -> float:
        """Everything but the framework overhead: what a tensor allocator sees."""
        return self.params + self.grads + self.optimizer + self.activations + self.logits

    @property
    def total(self) -> float:
        return self.model + self.overhead


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step, by part."""

    compute: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_comm + self.optimizer


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: Memory
    time: StepTime
    tokens_per_sec: float
    fits: bool


@dataclass
class Plan:
    """What :func:`plan` found."""

    world: int
    hardware: Hardware
    candidates: list[Prediction] = field(default_factory=list)  # every valid layout, ranked

    @property
    def fitting(self) -> list[Prediction]:
        return [p for p in self.candidates if p.fits]

    @property
    def best(self) -> Prediction:
        return self.fitting[0]


# --------------------------------------------------------------------------- memory

def _stage_layers(n_layer: int, pp: int, v: int) -> list[list[int]]:
    """Layer counts of each rank's chunks: chunk ``c`` of stage ``s`` is global chunk ``c*pp+s``."""
    sizes = split_uniform(n_layer, pp * v)
    return [[sizes[c * pp + s] for c in range(v)] for s in range(pp)]


@functools.lru_cache(maxsize=256)
def _param_counts(model_key: tuple, tp: int) -> tuple[float, float, float, float]:
    """Per-tp-rank elements of (one block, the embedding section, the head section,
    GPT's tied table when duplicated on the last stage)."""
    m = _MODEL_FROM_KEY[model_key]
    block = emb = head = tied = 0.0
    for t in family_spec(m):
        n = float(math.prod(t.shape))
        if t.split.kind != "replicated":
            n = _sharded(t, tp)
        if t.section == BLOCK:
            if t.block == 0:
                block += n
        elif t.section == EMBEDDING:
            emb += n
        elif t.section == HEAD:
            if t.tied_to is not None:
                tied += n
            else:
                head += n
    return block, emb, head, tied


def _sharded(tensor: Any, tp: int) -> float:
    dims = list(tensor.shape)
    if tensor.split.kind == "vocab":
        dims[0] = math.ceil(dims[0] / tp)
    else:
        return math.prod(dims) / tp
    return float(math.prod(dims))


_MODEL_FROM_KEY: dict[tuple, Any] = {}


def _model_key(m: Any) -> tuple:
    key = tuple(sorted(dataclasses.asdict(m).items()))
    _MODEL_FROM_KEY.setdefault(key, m)
    return key


def stage_parameters(m: Any, tp: int, pp: int, v: int = 1) -> list[float]:
    """Parameter elements on each pipeline rank (one tp shard)."""
    block, emb, head, tied = _param_counts(_model_key(m), tp)
    out = []
    for s, chunks in enumerate(_stage_layers(m.n_layer, pp, v)):
        n = block * sum(chunks)
        if s == 0:
            n += emb
        if s == pp - 1:
            n += head + (tied if pp > 1 else 0.0)
        out.append(n)
    return out


def activation_floats(framework: str, m: Any, tp: int, sp: bool,
                      table: dict | None = None) -> float:
    """Activation floats autograd keeps per token of one layer, on one tp rank
    (``table``: :data:`ACTIVATION_FLOATS` or :data:`PIPELINE_ACTIVATION_FLOATS`)."""
    table = ACTIVATION_FLOATS if table is None else table
    a_h, a_ff, a_kv, a_head, a_hs, const = table[(framework, m.family)]
    head_dim = m.d_model // m.n_head
    rep = REPLICATED_FLOATS[m.family] * m.d_model + const
    split = ((a_h - REPLICATED_FLOATS[m.family]) * m.d_model + a_ff * m.ff_width
             + a_kv * m.kv_heads * head_dim + a_head * m.n_head + a_hs * m.n_head * m.seq_len)
    return (rep / tp if sp else rep) + split / tp


def peak_in_flight(schedule: str, pp: int, m: int, v: int) -> tuple[int, ...]:
    """Most (micro-batch, chunk) pairs each stage holds at once.

    A stage holds its warm-up forwards plus the one it runs before its first
    backward, at most all ``m * v``: ``m`` for GPipe, ``p - s`` for 1F1B and
    ``2 (p - s - 1) + (v - 1) p + 1`` for the interleaved schedule
    (:mod:`hvdllm.common.schedules`; the tests check it against the
    simulator).
    """
    if pp == 1:
        return (1,)
    out = []
    for s in range(pp):
        if schedule == "gpipe":
            warm = m * v
        elif schedule == "interleaved" and v > 1:
            warm = 2 * (pp - s - 1) + (v - 1) * pp
        else:
            warm = pp - s - 1
        out.append(min(warm + 1, m * v))
    return tuple(out)


def predict_memory(cfg: Any, layout: Layout, hw: Hardware) -> Memory:
    """Peak bytes on the most loaded rank (see the module docstring)."""
    m, t = cfg.model, cfg.train
    framework = t.framework
    tp, pp, v, dp = layout.tp, layout.pp, layout.virtual_stages, layout.dp
    per_stage = stage_parameters(m, tp, pp, v)
    act_bytes = 2 if t.precision in ("bf16", "fp16") else 4
    tokens = layout.micro_batch_size * m.seq_len
    per_layer = activation_floats(framework, m, tp, layout.sequence_parallel) * tokens * act_bytes
    held_layer = per_layer
    if pp > 1 or layout.recompute == "full":
        # What a stage keeps between a micro-batch's forward and its backward, and
        # what recomputation rebuilds under a tape inside the gradient.
        held_layer = activation_floats(framework, m, tp, layout.sequence_parallel,
                                       PIPELINE_ACTIVATION_FLOATS) * tokens * act_bytes
    layer_input = m.d_model * tokens * act_bytes / (tp if layout.sequence_parallel else 1)
    chunks = _stage_layers(m.n_layer, pp, v)
    n_micro = t.global_batch_size // (layout.micro_batch_size * dp)
    held = peak_in_flight(layout.schedule if pp > 1 else "1f1b", pp, n_micro, v)
    opt_per_param = {"adamw": 8.0, "sgd": 4.0}.get(t.optimizer, 8.0)
    best: Memory | None = None
    for s in range(pp):
        params = per_stage[s] * 4
        grads = per_stage[s] * 4
        opt = per_stage[s] * opt_per_param / (dp if layout.zero else 1)
        if layout.zero:  # the flat gradient it reduce-scatters, and its fp32 master shard
            opt += per_stage[s] * 4 + per_stage[s] * 4 / dp
        layers_per_chunk = max(chunks[s])
        if layout.recompute == "full" and pp > 1:
            # a pipeline chunk keeps its input and runs all its layers again in backward
            acts = held[s] * layer_input + layers_per_chunk * held_layer
        elif layout.recompute == "full":  # per layer: one input each, one layer rebuilt
            acts = layers_per_chunk * layer_input + held_layer
        else:
            acts = held[s] * layers_per_chunk * held_layer
        logits = 0.0
        if s == pp - 1:
            vocab = math.ceil(m.vocab_size / tp)
            logits = 2.0 * tokens * vocab * 4
        mem = Memory(params, grads, opt, acts, logits, hw.overhead)
        if best is None or mem.total > best.total:
            best = mem
    assert best is not None
    return best


# --------------------------------------------------------------------------- time

def _allreduce(nbytes: float, ranks: int, bw: float, latency: float) -> float:
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * nbytes / bw + 2.0 * (ranks - 1) * latency


def _link(hw: Hardware, span: int) -> tuple[float, float]:
    """(bandwidth, latency) of a group whose ranks span ``span`` consecutive ranks."""
    if span <= hw.ranks_per_node:
        return hw.intra_bw, hw.intra_latency
    return hw.inter_bw, hw.inter_latency


def _layer_matmuls(m: Any, tokens: int, tp: int) -> list[float]:
    """FLOPs of each forward matmul of one layer for ``tokens`` tokens, on one tp rank."""
    h, ff, head_dim = m.d_model, m.ff_width, m.d_model // m.n_head
    kv = m.kv_heads * head_dim
    if m.family == "llama":
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)]
    else:
        shapes = [(h, 3 * h), (h, h), (h, ff), (ff, h)]
    out = [2.0 * tokens * k * n / tp for k, n in shapes]
    # attention scores and weighted sum: per sequence, per head
    heads = m.n_head / tp
    out.append(2.0 * 2.0 * tokens * m.seq_len * head_dim * heads / 2)  # causal half
    return out


def tp_collective_calls(cfg: Any, layout: Layout) -> int:
    """Tensor-parallel collectives of one step on one rank: per layer and
    micro-batch 2 forward and 2 backward (each a reduce-scatter and
    all-gather pair under sequence parallelism), and 2 for the loss."""
    if layout.tp <= 1:
        return 0
    n_micro = cfg.train.global_batch_size // (layout.micro_batch_size * layout.dp)
    layers = max(sum(c) for c in _stage_layers(cfg.model.n_layer, layout.pp,
                                              layout.virtual_stages))
    return n_micro * (layers * 4 * (2 if layout.sequence_parallel else 1) + 2)


def predict_time(cfg: Any, layout: Layout, hw: Hardware) -> StepTime:
    """Seconds of one optimizer step (see the module docstring)."""
    m, t = cfg.model, cfg.train
    tp, pp, dp, v = layout.tp, layout.pp, layout.dp, layout.virtual_stages
    mbs = layout.micro_batch_size
    n_micro = t.global_batch_size // (mbs * dp)
    tokens = mbs * m.seq_len
    share = 1.0
    if hw.shared_compute:
        share = max(1, min(hw.ranks_per_node, dp * tp * pp))
    act_bytes = 2 if t.precision in ("bf16", "fp16") else 4

    # One layer, one micro-batch: forward and backward (2x) matmuls at their size's rate.
    layer_fwd = sum(f / hw.rate(f) for f in _layer_matmuls(m, tokens, tp)) * share
    # each element-wise op reads and writes tensors about a layer activation's size
    elementwise = (activation_floats(t.framework, m, tp, layout.sequence_parallel)
                   * tokens * act_bytes * 3) / hw.mem_rate(tokens * m.d_model * act_bytes) * share
    ops = OPS_PER_LAYER.get(t.framework, 16) * hw.op_overhead
    fwd_layer = layer_fwd + elementwise + ops
    bwd_layer = 2.0 * layer_fwd + 2.0 * elementwise + 2.0 * ops
    if layout.recompute == "full":
        bwd_layer += fwd_layer
    layers = max(sum(c) for c in _stage_layers(m.n_layer, pp, v))
    vocab = math.ceil(m.vocab_size / tp)
    head_f = 2.0 * tokens * m.d_model * vocab
    head = (3.0 * head_f / hw.rate(head_f) * share
            + 3 * tokens * vocab * 4 / hw.mem_rate(tokens * vocab * 4) * share)
    per_micro = layers * (fwd_layer + bwd_layer) + head / pp  # the head sits on one stage
    compute = n_micro * per_micro * hw.compute_factor * (hw.pipeline_factor if pp > 1 else 1.0)

    # Tensor parallelism: 2 collectives of the layer activations forward, 2 backward.
    tp_comm = 0.0
    if tp > 1:
        bw, lat = _link(hw, tp)
        msg = tokens * m.d_model * act_bytes
        tp_comm = n_micro * layers * 4 * _allreduce(msg, tp, bw, lat) * (share if hw.shared_compute else 1)
        tp_comm += n_micro * 2 * _allreduce(tokens * 4.0, tp, bw, lat)  # the loss statistics
        # the engine's own cost per collective (sequence parallelism makes each
        # allreduce a reduce-scatter and all-gather pair)
        per_call = hw.collective_overhead
        if layout.sequence_parallel and hw.sp_collective_overhead is not None:
            per_call = hw.sp_collective_overhead
        tp_comm += tp_collective_calls(cfg, layout) * per_call

    # Pipeline: activation and gradient messages per micro-batch per chunk, and the bubble.
    pp_comm = bubble = 0.0
    if pp > 1:
        msg = tokens * m.d_model * act_bytes / (tp if layout.sequence_parallel else 1)
        span = dp * tp * 2
        bw, lat = (hw.p2p_bw, hw.p2p_latency) if span <= hw.ranks_per_node else \
            (hw.inter_bw, hw.inter_latency)
        pp_comm = n_micro * v * 2 * (lat + msg / bw + 2 * hw.wait_overhead)
        pp_comm += n_micro * v * hw.action_overhead
        bubble = (pp - 1) / (v * n_micro) * (compute + tp_comm + pp_comm)

    # Data parallelism: ring allreduce (or reduce-scatter + all-gather) of the stage's grads.
    stage_params = max(stage_parameters(m, tp, pp, v))
    dp_comm = 0.0
    if dp > 1:
        bw, lat = _link(hw, dp * tp)
        full = _allreduce(stage_params * 4, dp, bw, lat)
        hidden = min(full * hw.dp_overlap, layers * bwd_layer)
        dp_comm = full - hidden
    state = stage_params / (dp if layout.zero else 1)
    optimizer = state * 4 * 7 / hw.mem_bw * share
    return StepTime(compute, tp_comm, pp_comm, bubble, dp_comm, optimizer)


# --------------------------------------------------------------------------- enumeration

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_choices(m: Any) -> list[int]:
    """The tensor-parallel degrees the model's shapes allow."""
    limit = math.gcd(m.n_head, m.kv_heads, m.ff_width)
    return _divisors(limit)


def _tp_reason(m: Any, tp: int) -> str | None:
    """Why the model's shapes refuse ``tp`` (None when they allow it)."""
    keys = [("n_head", m.n_head)]
    if m.kv_heads != m.n_head:
        keys.append(("n_kv_head", m.kv_heads))
    keys.append(("d_ff", m.ff_width))
    for key, value in keys:
        if value % tp:
            return f"{key}={value} allows tp in {{{', '.join(map(str, _divisors(value)))}}}"
    return None


def _why_no_layout(cfg: Any, world: int) -> str:
    m, t = cfg.model, cfg.train
    reasons = []
    for tp in _divisors(world):
        why = _tp_reason(m, tp)
        if why:
            reasons.append(f"tp={tp}: {why}")
            continue
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            if pp > m.n_layer:
                reasons.append(f"tp={tp} pp={pp}: n_layer={m.n_layer} < pp")
            elif t.global_batch_size % dp:
                reasons.append(f"tp={tp} pp={pp} dp={dp}: global_batch_size="
                               f"{t.global_batch_size} is not divisible by dp={dp}")
            else:
                reasons.append(f"tp={tp} pp={pp} dp={dp}: rejected by the config checks")
    return "; ".join(reasons)


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3g} GB"


def enumerate_layouts(cfg: Any, world: int) -> list[Layout]:
    """Every layout of ``world`` ranks that the config checks accept."""
    from .config import validate

    m, t = cfg.model, cfg.train
    out: list[Layout] = []
    allowed = set(tp_choices(m))
    zero_ok = t.optimizer == "adamw" and t.compression == "none"
    for tp in _divisors(world):
        if tp not in allowed:
            continue
        for pp in _divisors(world // tp):
            if pp > m.n_layer:
                continue
            dp = world // (tp * pp)
            if t.global_batch_size % dp:
                continue
            for mbs in _divisors(t.global_batch_size // dp):
                n_micro = t.global_batch_size // (dp * mbs)
                scheds: list[tuple[str, int]] = [("1f1b", 1)]
                if pp > 1:
                    scheds.append(("gpipe", 1))
                    if m.n_layer % pp == 0 and n_micro % pp == 0:
                        per = m.n_layer // pp
                        scheds += [("interleaved", v) for v in _divisors(per) if v > 1]
                for sched, v in scheds:
                    for zero in ((0, 1) if dp > 1 and zero_ok else (0,)):
                        for rec in ("none", "full"):
                            sps = (False, True) if tp > 1 and m.seq_len % tp == 0 else (False,)
                            for sp in sps:
                                out.append(Layout(dp, tp, pp, mbs, sched, v, zero, rec, sp))
    valid = []
    for lay in out:
        try:
            validate(apply_layout(cfg, lay))
        except ConfigError:
            continue
        except Exception as exc:  # NotImplementedYetError is not a ConfigError
            if type(exc).__name__ == "NotImplementedYetError":
                continue
            raise
        valid.append(lay)
    return valid


def apply_layout(cfg: Any, layout: Layout) -> Any:
    """``cfg`` with the layout's settings."""
    p = replace(cfg.parallel, dp=layout.dp, tp=layout.tp, pp=layout.pp,
                schedule=layout.schedule if layout.pp > 1 else cfg.parallel.schedule,
                virtual_stages=layout.virtual_stages, recompute=layout.recompute,
                sequence_parallel=layout.sequence_parallel)
    t = replace(cfg.train, micro_batch_size=layout.micro_batch_size, zero=layout.zero)
    return replace(cfg, parallel=p, train=t)


def plan(cfg: Any, world: int, hw: Hardware, memory: float | None = None) -> Plan:
    """Rank every valid layout of ``cfg`` on ``world`` ranks.

    Args:
        memory: bytes per rank; overrides ``hw.memory`` (0 = no limit).

    Raises:
        ConfigError: no layout is valid, or none fits (naming the smallest).
    """
    if world < 1:
        raise ConfigError(f"--world must be >= 1, got {world}")
    limit = hw.memory if memory is None else memory
    layouts = enumerate_layouts(cfg, world)
    if not layouts:
        raise ConfigError(f"no valid layout of {cfg.model.family} (n_layer={cfg.model.n_layer}) "
                          f"on {world} ranks: {_why_no_layout(cfg, world)}")
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    preds = []
    for lay in layouts:
        mem = predict_memory(cfg, lay, hw)
        st = predict_time(cfg, lay, hw)
        fits = not limit or mem.total <= limit
        preds.append(Prediction(lay, mem, st, tokens / st.total, fits))
    preds.sort(key=lambda p: (not p.fits, p.time.total, p.memory.total))
    result = Plan(world, replace(hw, memory=limit), preds)
    if not result.fitting:
        low = min(preds, key=lambda p: p.memory.total)
        raise ConfigError(
            f"no layout fits in {_gb(limit)} per rank: the smallest predicted peak is "
            f"{_gb(low.memory.total)} ({low.layout.short()})")
    return result


# --------------------------------------------------------------------------- output

def format_plan(result: Plan, top: int = 10) -> str:
    hw = result.hardware
    lines = [f"hardware: {hw.name}",
             f"{len(result.candidates)} valid layouts on {result.world} ranks, "
             f"{len(result.fitting)} fit"
             + (f" in {hw.memory / GB:.2f} GB per rank" if hw.memory else ""),
             "",
             f"{'#':>3}  {'layout':<40} {'mem GB':>8} {'step s':>9} {'tokens/s':>10}  "
             f"{'compute':>7} {'tp':>5} {'pp':>5} {'bubble':>6} {'dp':>5}"]
    for i, p in enumerate(result.fitting[:top], 1):
        st = p.time
        part = lambda x: f"{x / st.total * 100:4.0f}%"  # noqa: E731
        lines.append(f"{i:>3}  {p.layout.short():<40} {p.memory.total / GB:8.3f} "
                     f"{st.total:9.4g} {p.tokens_per_sec:10.4g}  {part(st.compute):>7} "
                     f"{part(st.tp_comm):>5} {part(st.pp_comm):>5} {part(st.bubble):>6} "
                     f"{part(st.dp_comm):>5}")
    best = result.best
    lines += ["", "best layout:"] + [f"  --set {s}" for s in best.layout.overrides()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- calibration

def _matmul_chain(framework: str, a: Any, b: Any, count: int):
    """A callable running ``count`` dependent ``a @ b`` products the way the
    framework's engine runs them: torch eagerly, TensorFlow inside one graph."""
    if framework == "tensorflow":
        import tensorflow as tf

        ta, tb = tf.constant(a), tf.constant(b)

        @tf.function
        def graph(x, y):
            for _ in range(count):
                x = tf.linalg.matmul(x, y)
            return x

        graph(ta, tb)
        return lambda: graph(ta, tb).shape
    if framework == "torch":
        import torch

        mm, first, other = torch.mm, torch.from_numpy(a), torch.from_numpy(b)
    else:
        import numpy as np

        mm, first, other = np.matmul, a, b

    def run():
        x = first
        for _ in range(count):
            x = mm(x, other)
        return x
    return run


def measure_local(framework: str = "", sizes: Sequence[int] = (32, 64, 128, 256, 512, 1024),
                  repeats: int = 5) -> dict[str, Any]:
    """Time matmuls of several sizes, element-wise memory traffic and the cost of
    one framework op, in ``framework`` ("" = numpy), on this process's cores.

    Matmuls are chained (each multiplies the last result by an orthogonal
    matrix, so values neither vanish into denormals nor overflow) and run as
    the engine runs them: torch eagerly, TensorFlow in a graph.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    curve = []
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        # Enough products per call that the call's own cost (a tf.function
        # dispatch is ~1 ms) is amortized: at one product per call a 256-wide
        # matmul timed at a third of its real rate.
        count = max(4, min(200, int(4e8 // (2 * n ** 3))))
        run = _matmul_chain(framework, a, q.astype(np.float32), count)
        run()
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, (time.perf_counter() - start) / count)
        rate = 2.0 * n ** 3 / max(best, 1e-9)
        # A larger matmul is not slower per FLOP: a dip is the shared machine's noise.
        curve.append((2.0 * n ** 3, max(rate, curve[-1][1]) if curve else rate))
    mem_curve = []
    for floats in (64 * 1024, 512 * 1024, 8 * 1024 * 1024):  # 256 KiB, 2 MiB, 32 MiB
        src = np.ones(floats, dtype=np.float32)
        out = np.empty_like(src)
        loops = max(1, (8 * 1024 * 1024) // floats)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                np.multiply(src, 1.5, out=out)
            best = min(best, (time.perf_counter() - start) / loops)
        mem_curve.append((float(src.nbytes), 2 * src.nbytes / best))
    mem_bw = mem_curve[-1][1]
    eye = np.eye(2, dtype=np.float32)
    run = _matmul_chain(framework, eye, eye, 200)
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / 200)
    return {"matmul": curve, "mem_bw": mem_bw, "mem_curve": mem_curve, "op_overhead": best}


def _slowest_best(comm: Any, fn: Any, repeats: int, calls: int = 1) -> float:
    """``fn``'s best time over ``repeats`` (per call of ``calls``), the slowest rank's."""
    from mpi4py import MPI

    fn()
    comm.Barrier()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return comm.allreduce(best, op=MPI.MAX)


def measure_comm(comm: Any, sizes: Sequence[int] = (1 << 10, 1 << 16, 1 << 22),
                 repeats: int = 5) -> dict[str, float]:
    """Fit latency and bandwidth of an allreduce and a send/recv among ``comm``'s ranks."""
    import numpy as np
    from mpi4py import MPI

    n = comm.Get_size()
    rank = comm.Get_rank()

    def timed(fn):
        return _slowest_best(comm, fn, repeats)

    ar, pp = [], []
    for size in sizes:
        buf = np.ones(size // 4, dtype=np.float32)
        ar.append((size, timed(lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))))

        def ping():
            if rank == 0:
                comm.Send(buf, dest=1, tag=7)
                comm.Recv(buf, source=1, tag=8)
            elif rank == 1:
                comm.Recv(buf, source=0, tag=7)
                comm.Send(buf, dest=0, tag=8)
        pp.append((size, timed(ping) / 2))

    def fit(points, scale):
        (s0, t0), (s1, t1) = points[0], points[-1]
        bw = scale * (s1 - s0) / max(t1 - t0, 1e-9)
        lat = max(t0 - scale * s0 / bw, 1e-7)
        return bw, lat

    ring = 2.0 * (n - 1) / n
    ar_bw, ar_lat = fit(ar, ring)
    p_bw, p_lat = fit(pp, 1.0)
    return {"allreduce_bw": ar_bw, "allreduce_latency": ar_lat / max(1, 2 * (n - 1)),
            "p2p_bw": p_bw, "p2p_latency": p_lat}


def calibrate(framework: str, comm: Any, ranks_per_node: int, memory: float,
              overhead: float) -> Hardware:
    """Measure this machine (``comm`` of at least two ranks on it) into a :class:`Hardware`."""
    import socket

    # Every rank times its compute at once, with the threads a training rank
    # gets (its share of the node's cores), so the rates are what each rank
    # sees while the others compute too; the mean over ranks is kept.
    from .launch import threads_per_rank

    _use_threads(framework, threads_per_rank(comm))
    comm.Barrier()
    measured = comm.allgather(measure_local(framework))
    local = {
        "matmul": [(f, sum(m["matmul"][i][1] for m in measured) / len(measured))
                   for i, (f, _) in enumerate(measured[0]["matmul"])],
        "mem_bw": sum(m["mem_bw"] for m in measured) / len(measured),
        "mem_curve": [(b, sum(m["mem_curve"][i][1] for m in measured) / len(measured))
                      for i, (b, _) in enumerate(measured[0]["mem_curve"])],
        "op_overhead": sum(m["op_overhead"] for m in measured) / len(measured),
    }
    net = measure_comm(comm)
    engine = measure_engine(framework, comm, net)
    return Hardware(
        name=f"calibrated on {socket.gethostname()} ({framework or 'numpy'}, "
             f"{time.strftime('%Y-%m-%d')})",
        matmul=tuple(tuple(p) for p in local["matmul"]), mem_bw=local["mem_bw"],
        mem_curve=tuple(tuple(p) for p in local["mem_curve"]),
        op_overhead=local["op_overhead"],
        intra_bw=net["allreduce_bw"], intra_latency=net["allreduce_latency"],
        inter_bw=net["allreduce_bw"], inter_latency=net["allreduce_latency"],
        p2p_bw=net["p2p_bw"], p2p_latency=net["p2p_latency"],
        memory=memory, ranks_per_node=ranks_per_node, shared_compute=False,
        overhead=overhead, **engine)


def measure_engine(framework: str, comm: Any, net: dict[str, float],
                   repeats: int = 5, calls: int = 40) -> dict[str, float]:
    """What the engines' own paths add beyond the link and the compute.

    * ``wait_overhead``: a small allreduce completed by hvdllm's polled wait
      (:func:`hvdllm.common.p2p.wait_requests`, the path of every
      point-to-point message and of torch's tensor-parallel collectives),
      less the same allreduce blocking;
    * ``collective_overhead``: a tensor-parallel collective as the framework's
      engine runs it (torch: that polled wait; TensorFlow: a Horovod
      allreduce inside a traced graph), less the blocking MPI one;
    * ``action_overhead``: a tiny layer's forward and backward driven the way
      a pipeline stage drives a chunk (torch: autograd; TensorFlow: a traced
      call under an eager tape, its gradient and the gradient sum).
    """
    import numpy as np
    from mpi4py import MPI

    from .p2p import wait_requests

    buf = np.ones(256, dtype=np.float32)

    def best_of(fn) -> float:
        return _slowest_best(comm, fn, repeats, calls)

    def blocking():
        for _ in range(calls):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def polled():
        for _ in range(calls):
            wait_requests([comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)], "calibration",
                          time.monotonic() + 60)

    base = best_of(blocking)
    wait = max(0.0, best_of(polled) - base)
    collective = wait
    if framework == "tensorflow":
        try:
            chain = _horovod_graph_allreduce(calls)
        except ImportError:  # no Horovod: the TensorFlow engine cannot run tp > 1 anyway
            chain = None
        if chain is not None:
            collective = max(0.0, best_of(chain) - base)
    action = best_of(_chunk_driver(framework, calls)) if framework else 0.0
    return {"wait_overhead": wait, "collective_overhead": collective,
            "action_overhead": action}


def _horovod_graph_allreduce(calls: int):
    """``calls`` dependent Horovod allreduces of 1 KiB in one traced graph."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    x0 = tf.ones([256])

    @tf.function
    def chain(x):
        for i in range(calls):
            x = hvd.allreduce(x * 0.5, op=hvd.Sum, name=f"hvdllm.calibrate.{i}")
        return x

    return lambda: chain(x0).numpy()


def _chunk_driver(framework: str, calls: int):
    """``calls`` forward+backward pairs of an 8-wide layer, driven as a stage does."""
    if framework == "tensorflow":
        import tensorflow as tf

        w = tf.Variable(tf.ones([8, 8]) * 0.1)
        x = tf.ones([8, 8])

        @tf.function(autograph=False)
        def forward(inp):
            return tf.tanh(tf.linalg.matmul(inp, w))

        @tf.function(autograph=False)
        def add(a, b):
            return a + b

        def run():
            total = tf.zeros([8, 8])
            for _ in range(calls):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = forward(x)
                gx, gw = tape.gradient(out, [x, w], output_gradients=tf.ones([8, 8]))
                total = add(total, gw)
            return total.numpy()
        return run
    import torch

    layer = torch.nn.Linear(8, 8)
    x = torch.ones(8, 8, requires_grad=True)

    def run_torch():
        for _ in range(calls):
            out = torch.tanh(layer(x))
            out.backward(torch.ones(8, 8))
    return run_torch


def _use_threads(framework: str, threads: int) -> None:
    """Give the framework the thread count a training rank would use."""
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
    elif framework == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(2)
        except RuntimeError:  # TensorFlow already runs: its pools keep their size
            pass


def physical_memory() -> float:
    """Bytes of memory on this node (``MemTotal``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resident_bytes() -> float:
    """This process's resident memory (``VmRSS``), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def framework_baseline(framework: str) -> float:
    """Resident bytes of a process once ``framework`` (and MPI) is loaded: the
    per-rank memory a run takes before its model."""
    if framework == "torch":
        import torch  # noqa: F401
    elif framework == "tensorflow":
        import tensorflow as tf

        tf.constant(1.0) + 1.0  # the runtime allocates its pools on first use
    return resident_bytes()


def save_plan_json(result: Plan, path: str | Path) -> None:
    """Every prediction of ``result`` as JSON (layout, memory and time by part)."""
    rows = []
    for p in result.candidates:
        rows.append({"layout": dataclasses.asdict(p.layout), "fits": p.fits,
                     "memory": dict(dataclasses.asdict(p.memory), total=p.memory.total,
                                    model=p.memory.model),
                     "time": dict(dataclasses.asdict(p.time), total=p.time.total),
                     "tokens_per_sec": p.tokens_per_sec, "overrides": p.layout.overrides()})
    Path(path).write_text(json.dumps({"world": result.world, "hardware": result.hardware.name,
                                      "candidates": rows}, indent=1) + "\n")


def save_hardware(hw: Hardware, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(hw.to_json(), indent=1) + "\n")
    tmp.replace(p)


def load_hardware(path: str | Path) -> Hardware:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration file not found: {p} (make one with `hvdllm plan "
                          f"--calibrate`, or pick --hardware from {', '.join(PRESETS)})")
    try:
        return Hardware.from_json(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"calibration file {p} is not valid: {exc}") from None


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    xs, ys = list(a), list(b)
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((x - mx) * (y - my) for x, y in zip(rx, ry))
    vx = math.sqrt(sum((x - mx) ** 2 for x in rx))
    vy = math.sqrt(sum((y - my) ** 2 for y in ry))
    return cov / (vx * vy) if vx and vy else 0.0
