"""hvdllm: train GPT- and LLaMA-style language models on many processes.

Built on Horovod and MPI, for PyTorch and TensorFlow/Keras 3.  The
framework-free core lives in :mod:`hvdllm.common`; the adapters in
:mod:`hvdllm.torch` and :mod:`hvdllm.tensorflow`.
"""

__version__ = "0.1.0"
