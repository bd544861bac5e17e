"""PyTorch glue for checkpoints: fill a reference model from one, or export one.

A checkpoint source is written ``"hf:DIR"`` for a Hugging Face directory
(see :mod:`hvdllm.common.hf`) or as the path of an hvdllm checkpoint (see
:mod:`hvdllm.common.checkpoint`).  Loading fills the full, plain reference
model; tensor parallelism slices the loaded weights afterwards, so every
layout starts from the same numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..common.checkpoint import check_tensors
from ..common.config import ModelConfig
from ..common.hf import save_hf_checkpoint
from ..common.init_from import initial_tensors

def init_from(model: torch.nn.Module, spec: str, model_cfg: ModelConfig) -> None:
    """Overwrite every parameter of a full, plain reference model with a checkpoint's.

    Args:
        model: a ``GPT`` or ``Llama`` built from ``model_cfg`` (not yet
            parallelized).
        spec: ``"hf:DIR"`` or an hvdllm checkpoint path (``model.init_from``).
        model_cfg: the model section the model was built from.
    """
    tensors = initial_tensors(spec, model_cfg)
    params = dict(model.named_parameters())  # GPT's tied lm_head.weight appears as wte.weight
    check_tensors({k: v.shape for k, v in tensors.items()},
                  {k: tuple(p.shape) for k, p in params.items()}, f"checkpoint {spec}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.array(tensors[name])))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of a full model's parameters (GPT's tied head once, as wte).

    Args:
        model: a full (gathered, unsharded) reference model.
    """
    return {name: p.detach().to("cpu", torch.float32, copy=True).numpy()
            for name, p in model.named_parameters()}


def export_hf(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor | np.ndarray],
              model_cfg: ModelConfig, out_dir: str | Path) -> None:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        model_or_state: a full reference model, or its full state dict
            (torch tensors or numpy arrays; GPT's ``lm_head.weight`` may be in it).
        model_cfg: the model section the model was built from.
        out_dir: the directory to create (must not exist, or be empty).
    """
    if isinstance(model_or_state, torch.nn.Module):
        tensors = state_dict_numpy(model_or_state)
    else:
        tensors = {name: value.detach().to("cpu", torch.float32).numpy()
                   if isinstance(value, torch.Tensor) else np.asarray(value)
                   for name, value in model_or_state.items()}
    save_hf_checkpoint(out_dir, model_cfg, tensors)
