"""What the TensorFlow adapter runs (read by the config checks; imports no framework)."""
from ..common.capabilities import Capabilities

CAPABILITIES = Capabilities("tensorflow", frozenset({
    "family:gpt", "family:llama", "init_from",
    "tensor_parallel", "sequence_parallel",
    "pipeline", "schedule:gpipe", "schedule:1f1b", "schedule:interleaved",
    "partition:uniform", "partition:parameters", "partition:balanced",
    "recompute:full",
    "optimizer:adamw", "optimizer:sgd",
    "compression:fp16", "compression:bf16", "compression:topk", "compression:powersgd",
    "zero:1", "precision:bf16", "precision:fp16", "grad_clip",
}))
