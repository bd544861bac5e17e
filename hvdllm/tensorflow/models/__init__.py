"""Reference transformer models as Keras 3 layers (TensorFlow backend)."""
from .causal_self_attention import CausalSelfAttention
from .gpt import GPT
from .mlp import MLP
from .position_embedding import PositionEmbedding
from .transformer_block import TransformerBlock

__all__ = ["GPT", "CausalSelfAttention", "MLP", "PositionEmbedding", "TransformerBlock"]
