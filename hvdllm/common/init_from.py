"""``model.init_from``, framework-free: the checkpoint's tensors for a model config.

A source is written ``"hf:DIR"`` for a Hugging Face directory (see
:mod:`hvdllm.common.hf`) or as the path of an hvdllm checkpoint, a training
checkpoint or a run's ``output.dir`` (see :mod:`hvdllm.common.checkpoint`).
Each framework adapter copies the tensors into its full reference model;
tensor parallelism slices them afterwards, so every layout starts from the
same numbers.
"""
from __future__ import annotations

import math

import numpy as np

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .family import family_spec, get_family
from .hf import load_hf_checkpoint

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


def initial_tensors(spec: str, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The logical tensors of checkpoint source ``spec``, checked against ``model_cfg``.

    A learned position table longer than ``model.seq_len`` is cut to it.

    Args:
        spec: ``model.init_from``.
        model_cfg: the model section of the model being filled.

    Raises:
        CheckpointError: naming every model field on which they disagree.
    """
    ckpt_cfg, tensors = read_source(spec)
    problems = config_mismatches(ckpt_cfg, model_cfg)
    if problems:
        raise CheckpointError(f"checkpoint {spec} does not fit the [model] config: "
                              + "; ".join(problems))
    tensors = dict(tensors)
    for t in family_spec(model_cfg):
        if t.role == "positions" and t.name in tensors:  # the leading positions are used
            tensors[t.name] = tensors[t.name][:model_cfg.seq_len]
    return tensors
