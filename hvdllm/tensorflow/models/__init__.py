"""Reference transformer models as Keras 3 layers (TensorFlow backend), a layer per file."""
from .base import CausalLM, LMCrossEntropy
from .causal_self_attention import CausalSelfAttention
from .gpt import GPT
from .llama import Llama
from .llama_attention import LlamaAttention
from .llama_block import LlamaBlock
from .mlp import MLP
from .position_embedding import PositionEmbedding
from .rms_norm import RMSNorm
from .swiglu import SwiGLU
from .transformer_block import TransformerBlock

#: The Keras model of each ``model.family``.
MODEL_CLASSES = {"gpt": GPT, "llama": Llama}

__all__ = ["MODEL_CLASSES", "CausalLM", "LMCrossEntropy", "GPT", "Llama", "CausalSelfAttention", "LlamaAttention", "LlamaBlock",
           "MLP", "PositionEmbedding", "RMSNorm", "SwiGLU", "TransformerBlock"]
