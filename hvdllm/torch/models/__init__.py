"""Reference transformer models for PyTorch."""
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
