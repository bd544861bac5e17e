"""Reference transformer models for PyTorch: GPT-2 and LLaMA families."""
from .base import CausalLM, LMCrossEntropy
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig

__all__ = ["CausalLM", "GPT", "GPTConfig", "LMCrossEntropy", "Llama", "LlamaConfig"]
