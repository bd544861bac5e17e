"""What the TensorFlow adapter runs (read by the config checks; imports no framework)."""
from ..common.capabilities import Capabilities

CAPABILITIES = Capabilities("tensorflow", frozenset({
    "family:gpt", "family:llama", "init_from",
    "optimizer:adamw",
}))
