"""Hugging Face checkpoints <-> hvdllm, framework-free (numpy only).

Two model types are understood, each mapped onto an hvdllm family:

* ``gpt2`` (``GPT2LMHeadModel``) <-> ``gpt``.  GPT-2's linear layers are
  ``Conv1D`` modules whose weights are stored transposed, as (in, out), so
  every matrix but the embeddings is transposed on the way.  The fused
  ``c_attn`` holds the q, k and v blocks in the same order as hvdllm's fused
  ``qkv`` rows, so a transpose is all it needs.  The head is tied to ``wte``
  and may be absent from the files; the causal-mask buffers ``attn.bias`` and
  ``attn.masked_bias`` of older checkpoints are ignored, as is a missing
  ``transformer.`` prefix (checkpoints saved from ``GPT2Model``).
* ``llama`` (``LlamaForCausalLM``) <-> ``llama``.  Same layout as hvdllm's
  linear layers; RoPE uses the same rotate-half pairing, so q and k need no
  permutation.  Stale ``rotary_emb.inv_freq`` buffers are ignored.

A Hugging Face directory holds ``config.json`` and either
``model.safetensors`` or ``model.safetensors.index.json`` with its shards.
Every tensor is checked against the shapes ``config.json`` implies; a
mismatch names the tensor (in Hugging Face's naming) and both shapes.

Dropout is a training setting, not part of a checkpoint: imports leave
``model.dropout`` at its default and exports write zero dropout.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .checkpoint import (Shape, atomic_directory, check_tensors, drop_tied_head,
                         parameter_shapes, parse_model_config, read_safetensors,
                         write_safetensors, write_text_synced)
from .config import ModelConfig
from .errors import CheckpointError
from .family import FAMILIES, family_spec

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"


def _families() -> str:
    return " and ".join(f"'{f.hf_model_type}'" for f in FAMILIES.values())


def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """hvdllm parameter name -> (Hugging Face name, stored transposed there).

    The per-family tables live in :mod:`hvdllm.common.family`.

    Args:
        cfg: the model section; its family and n_layer decide the names.
    """
    return family_spec(cfg).hf_names()


def hf_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Hugging Face tensor name -> shape, as stored in a checkpoint for ``cfg``.

    Args:
        cfg: the model section.
    """
    shapes = parameter_shapes(cfg)
    return {theirs: shapes[ours][::-1] if transposed else shapes[ours]
            for ours, (theirs, transposed) in hf_names(cfg).items()}


def _need(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"{where} lacks '{key}'")
    return hf[key]


def _refuse(hf: Mapping[str, Any], key: str, default: Any, allowed: tuple, where: str,
            why: str) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(f"{where}: {key}={json.dumps(value)} is not supported ({why})")


def _gpt2_config(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    _refuse(hf, "activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"), where,
            "hvdllm's gpt uses the tanh approximation of GELU")
    _refuse(hf, "scale_attn_weights", True, (True,), where,
            "hvdllm's gpt scales attention scores by 1/sqrt(head size)")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", False, (False,), where,
            "hvdllm's gpt does not scale attention by layer")
    _refuse(hf, "add_cross_attention", False, (False,), where, "decoder-only models only")
    _refuse(hf, "tie_word_embeddings", True, (True,), where,
            "hvdllm's gpt ties the output head to the token embedding")
    d = _need(hf, "n_embd", where)
    return dict(family="gpt", n_layer=_need(hf, "n_layer", where),
                n_head=_need(hf, "n_head", where), d_model=d,
                d_ff=hf.get("n_inner") or 4 * d, seq_len=_need(hf, "n_positions", where),
                vocab_size=_need(hf, "vocab_size", where),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
    """theta from ``rope_parameters`` (transformers 5), ``rope_scaling`` or ``rope_theta``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise CheckpointError(f"{where}: rope_parameters must be a table, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"{where}: rope type '{kind}' is not supported (hvdllm's llama "
                              f"has plain rotary embeddings, rope_type 'default')")
    return rope.get("rope_theta", hf.get("rope_theta", 10000.0))


def _llama_config(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    _refuse(hf, "hidden_act", "silu", ("silu",), where, "hvdllm's llama uses SwiGLU")
    for key in ("attention_bias", "mlp_bias"):
        _refuse(hf, key, False, (False,), where, "hvdllm's llama has no biases")
    _refuse(hf, "tie_word_embeddings", False, (False,), where,
            "hvdllm's llama has an untied output head")
    d, heads = _need(hf, "hidden_size", where), _need(hf, "num_attention_heads", where)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != d:
        raise CheckpointError(f"{where}: head_dim={head_dim} x num_attention_heads={heads} != "
                              f"hidden_size={d}; hvdllm's llama needs head_dim = hidden_size / "
                              f"heads")
    return dict(family="llama", n_layer=_need(hf, "num_hidden_layers", where), n_head=heads,
                n_kv_head=hf.get("num_key_value_heads") or heads, d_model=d,
                d_ff=_need(hf, "intermediate_size", where),
                seq_len=_need(hf, "max_position_embeddings", where),
                vocab_size=_need(hf, "vocab_size", where),
                norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf, where))


# Hugging Face config.json -> [model] fields, per family.
_CONFIG_READERS = {"gpt": _gpt2_config, "llama": _llama_config}


def model_config_from_hf(hf: Mapping[str, Any], where: str = HF_CONFIG_FILE) -> ModelConfig:
    """The hvdllm model section equivalent to a Hugging Face ``config.json``.

    Args:
        hf: the parsed ``config.json``.
        where: its path, for messages.
    """
    model_type = hf.get("model_type")
    family = next((f.name for f in FAMILIES.values() if f.hf_model_type == model_type), None)
    if family is None:
        raise CheckpointError(f"{where}: model_type {json.dumps(model_type)} is not supported; "
                              f"hvdllm reads {_families()}")
    return parse_model_config(_CONFIG_READERS[family](hf, where), where)


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (as a dict) for a model with section ``cfg``.

    Args:
        cfg: the model section.
    """
    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.init_std, bos_token_id=None,
                  eos_token_id=None, dtype="float32")
    if cfg.family == "gpt":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                    n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.ff_width, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    tie_word_embeddings=True, **common)
    # rope_theta also at top level, where transformers before version 5 reads it.
    return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                hidden_size=cfg.d_model, intermediate_size=cfg.ff_width,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.d_model // cfg.n_head,
                hidden_act="silu", max_position_embeddings=cfg.seq_len,
                rms_norm_eps=cfg.norm_eps, attention_dropout=0.0, attention_bias=False,
                mlp_bias=False, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                rope_theta=cfg.rope_theta, **common)


def hf_to_hvdllm(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                 where: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename and re-lay Hugging Face tensors into hvdllm parameters, checking every shape.

    Args:
        cfg: the model section the checkpoint's config.json describes.
        tensors: Hugging Face name -> array.
        where: the checkpoint's path, for messages.
    """
    spec = family_spec(cfg)
    family = spec.family
    # A GPT-2 saved from GPT2Model (as the original release was) lacks the prefix.
    prefix = family.hf_optional_prefix
    bare = bool(prefix) and not any(n.startswith(prefix) for n in tensors)
    unprefixed = {t.hf_name for t in spec if t.hf_name and not t.hf_name.startswith(prefix)}
    ignored = re.compile(family.hf_ignored)
    found = {}
    for name, array in tensors.items():
        if bare and name not in unprefixed:
            name = prefix + name
        if not ignored.fullmatch(name):
            found[name] = array
    expected = hf_shapes(cfg)
    for t in spec:  # a tied tensor may be there too: transformers ignores it
        if t.tied_to is not None and t.hf_name in found:
            expected[t.hf_name] = expected[spec[t.tied_to].hf_name]
    check_tensors({k: v.shape for k, v in found.items()}, expected, where)
    return {ours: found[theirs].T if transposed else found[theirs]
            for ours, (theirs, transposed) in spec.hf_names().items()}


def hvdllm_to_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and re-lay hvdllm parameters into Hugging Face tensors.

    Args:
        cfg: the model section.
        tensors: hvdllm name -> full array; GPT's tied ``lm_head.weight`` may
            be included or not.
    """
    tensors = drop_tied_head(cfg, tensors)
    check_tensors({k: v.shape for k, v in tensors.items()}, parameter_shapes(cfg),
                  "the tensors to export")
    return {theirs: np.ascontiguousarray(tensors[ours].T) if transposed else tensors[ours]
            for ours, (theirs, transposed) in hf_names(cfg).items()}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face checkpoint directory.

    Args:
        path: the directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory {path} not found")
    config_path = path / HF_CONFIG_FILE
    try:
        hf = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint: {HF_CONFIG_FILE} "
                              f"is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return hf


def read_hf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face directory, from one file or an indexed set of shards.

    Args:
        path: the directory.
    """
    path = Path(path)
    if (path / HF_WEIGHTS_FILE).is_file():
        return read_safetensors(path / HF_WEIGHTS_FILE)
    index_path = path / HF_INDEX_FILE
    if not index_path.is_file():
        hint = (" (pytorch_model.bin is not read: save with safetensors)"
                if any(path.glob("pytorch_model*.bin")) else "")
        raise CheckpointError(f"{path} holds neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE}"
                              f"{hint}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index_path}: {exc!r}") from None
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        for name, array in read_safetensors(path / file).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor '{name}' is in more than one shard")
            tensors[name] = array
    for name, file in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{index_path} puts tensor '{name}' in {file}, which "
                                  f"does not hold it")
    return tensors


def load_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a Hugging Face directory as an hvdllm model section and hvdllm-named tensors.

    Args:
        path: the directory (config.json plus safetensors weights).
    """
    path = Path(path)
    cfg = model_config_from_hf(read_hf_config(path), str(path / HF_CONFIG_FILE))
    return cfg, hf_to_hvdllm(cfg, read_hf_tensors(path), str(path))


def save_hf_checkpoint(path: str | Path, cfg: ModelConfig,
                       tensors: Mapping[str, np.ndarray]) -> None:
    """Write a Hugging Face directory (config.json + model.safetensors) atomically.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it.

    Args:
        path: the directory to create (must not exist, or be empty).
        cfg: the model section.
        tensors: hvdllm-named full tensors.
    """
    hf_tensors = hvdllm_to_hf(cfg, tensors)
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / HF_WEIGHTS_FILE, hf_tensors, {"format": "pt"})
        write_text_synced(tmp / HF_CONFIG_FILE,
                          json.dumps(hf_config_from_model(cfg), indent=2) + "\n")
