"""PyTorch glue for checkpoints: fill a reference model from one, or export one.

A checkpoint source is written ``"hf:DIR"`` for a Hugging Face directory
(see :mod:`hvdllm.common.hf`) or as the path of an hvdllm checkpoint (see
:mod:`hvdllm.common.checkpoint`).  Loading fills the full, plain reference
model; tensor parallelism slices the loaded weights afterwards, so every
layout starts from the same numbers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..common.checkpoint import check_tensors, load_checkpoint
from ..common.config import ModelConfig
from ..common.errors import CheckpointError
from ..common.family import family_spec, get_family
from ..common.hf import load_hf_checkpoint, save_hf_checkpoint

HF_PREFIX = "hf:"


def read_source(spec: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The model section and hvdllm-named tensors of a checkpoint source.

    Args:
        spec: ``"hf:DIR"`` (Hugging Face directory) or an hvdllm checkpoint path.
    """
    if spec.startswith(HF_PREFIX):
        return load_hf_checkpoint(spec[len(HF_PREFIX):])
    return load_checkpoint(spec)


def config_mismatches(ckpt: ModelConfig, model: ModelConfig) -> list[str]:
    """One line per model-section field on which a checkpoint and a model disagree.

    Compared: everything that fixes a tensor's shape or the model's function
    (``dropout`` and ``init_std`` are training settings and are not).
    ``seq_len`` may be shorter than the checkpoint's for gpt (the leading
    position embeddings are used) and anything for llama (rotary positions
    have no table).

    Args:
        ckpt: the checkpoint's model section.
        model: the model section of the model being filled.
    """
    pairs = [("family", ckpt.family, model.family), ("n_layer", ckpt.n_layer, model.n_layer),
             ("n_head", ckpt.n_head, model.n_head),
             ("n_kv_head", ckpt.kv_heads, model.kv_heads),
             ("d_model", ckpt.d_model, model.d_model), ("d_ff", ckpt.ff_width, model.ff_width),
             ("vocab_size", ckpt.vocab_size, model.vocab_size)]
    lines = [f"model.{key} is {theirs} in the checkpoint but {ours} in the config"
             for key, theirs, ours in pairs if theirs != ours]
    if not math.isclose(ckpt.norm_eps, model.norm_eps, rel_tol=1e-9):
        lines.append(f"model.norm_eps is {ckpt.norm_eps} in the checkpoint but {model.norm_eps} "
                     f"in the config")
    positions = get_family(model.family).positions
    if positions == "rotary" and not math.isclose(ckpt.rope_theta, model.rope_theta,
                                                  rel_tol=1e-9):
        lines.append(f"model.rope_theta is {ckpt.rope_theta} in the checkpoint but "
                     f"{model.rope_theta} in the config")
    if positions == "learned" and model.seq_len > ckpt.seq_len:
        lines.append(f"model.seq_len is {ckpt.seq_len} in the checkpoint (its position "
                     f"embeddings) but {model.seq_len} in the config; use at most {ckpt.seq_len}")
    return lines


def init_from(model: torch.nn.Module, spec: str, model_cfg: ModelConfig) -> None:
    """Overwrite every parameter of a full, plain reference model with a checkpoint's.

    Args:
        model: a ``GPT`` or ``Llama`` built from ``model_cfg`` (not yet
            parallelized).
        spec: ``"hf:DIR"`` or an hvdllm checkpoint path (``model.init_from``).
        model_cfg: the model section the model was built from.
    """
    ckpt_cfg, tensors = read_source(spec)
    problems = config_mismatches(ckpt_cfg, model_cfg)
    if problems:
        raise CheckpointError(f"checkpoint {spec} does not fit the [model] config: "
                              + "; ".join(problems))
    for t in family_spec(model_cfg):
        if t.role == "positions" and t.name in tensors:  # the leading positions are used
            tensors[t.name] = tensors[t.name][:model_cfg.seq_len]
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
