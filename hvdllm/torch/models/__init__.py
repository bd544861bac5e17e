"""Reference transformer models for PyTorch: GPT-2 and LLaMA families.

Their parameter names, shapes, tensor-parallel splits and ties are the
framework-free contract of :mod:`hvdllm.common.family`; a model's
``spec`` property resolves it for the model's config.
"""
from __future__ import annotations

from ...common.config import ModelConfig
from .base import CausalLM, LMCrossEntropy
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig

# model.family -> (model class, its config class).
MODEL_CLASSES: dict[str, tuple[type[CausalLM], type]] = {
    "gpt": (GPT, GPTConfig),
    "llama": (Llama, LlamaConfig),
}


def model_from_config(m: ModelConfig) -> CausalLM:
    """A freshly initialised reference model for a ``[model]`` section (seed it first).

    Args:
        m: the model section.
    """
    if m.family not in MODEL_CLASSES:
        raise ValueError(f"no PyTorch reference model for family {m.family!r}; one of: "
                         f"{', '.join(MODEL_CLASSES)}")
    model_cls, config_cls = MODEL_CLASSES[m.family]
    return model_cls(config_cls.from_model_config(m))


__all__ = ["CausalLM", "GPT", "GPTConfig", "LMCrossEntropy", "Llama", "LlamaConfig",
           "MODEL_CLASSES", "model_from_config"]
