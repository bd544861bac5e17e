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

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"

# Per-layer names: hvdllm suffix, Hugging Face suffix, stored transposed in HF.
_GPT2_LAYER = [
    ("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True), ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True), ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_GPT2_GLOBAL = [
    ("wte.weight", "transformer.wte.weight"), ("wpe.weight", "transformer.wpe.weight"),
    ("ln_f.weight", "transformer.ln_f.weight"), ("ln_f.bias", "transformer.ln_f.bias"),
]
_LLAMA_LAYER = [
    ("attn_norm.weight", "input_layernorm.weight", False),
    ("attn.wq.weight", "self_attn.q_proj.weight", False),
    ("attn.wk.weight", "self_attn.k_proj.weight", False),
    ("attn.wv.weight", "self_attn.v_proj.weight", False),
    ("attn.wo.weight", "self_attn.o_proj.weight", False),
    ("mlp_norm.weight", "post_attention_layernorm.weight", False),
    ("mlp.w_gate.weight", "mlp.gate_proj.weight", False),
    ("mlp.w_up.weight", "mlp.up_proj.weight", False),
    ("mlp.w_down.weight", "mlp.down_proj.weight", False),
]
_LLAMA_GLOBAL = [
    ("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
# Non-parameter buffers that some checkpoints carry; they hold nothing to load.
_IGNORED = {
    "gpt": re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"),
    "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
}


def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """hvdllm parameter name -> (Hugging Face name, stored transposed there).

    Args:
        cfg: the model section; its family and n_layer decide the names.
    """
    if cfg.family == "gpt":
        layer, glob, prefix = _GPT2_LAYER, _GPT2_GLOBAL, "transformer.h."
    else:
        layer, glob, prefix = _LLAMA_LAYER, _LLAMA_GLOBAL, "model.layers."
    names = {ours: (theirs, False) for ours, theirs in glob}
    for i in range(cfg.n_layer):
        for ours, theirs, transposed in layer:
            names[f"blocks.{i}.{ours}"] = (f"{prefix}{i}.{theirs}", transposed)
    return names


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


def model_config_from_hf(hf: Mapping[str, Any], where: str = HF_CONFIG_FILE) -> ModelConfig:
    """The hvdllm model section equivalent to a Hugging Face ``config.json``.

    Args:
        hf: the parsed ``config.json``.
        where: its path, for messages.
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        fields = _gpt2_config(hf, where)
    elif model_type == "llama":
        fields = _llama_config(hf, where)
    else:
        raise CheckpointError(f"{where}: model_type {json.dumps(model_type)} is not supported; "
                              f"hvdllm reads 'gpt2' and 'llama'")
    return parse_model_config(fields, where)


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
    # A GPT-2 saved from GPT2Model (as the original release was) lacks the prefix.
    bare = cfg.family == "gpt" and not any(n.startswith("transformer.") for n in tensors)
    found = {}
    for name, array in tensors.items():
        if bare and name != "lm_head.weight":
            name = "transformer." + name
        if not _IGNORED[cfg.family].fullmatch(name):
            found[name] = array
    expected = hf_shapes(cfg)
    if cfg.family == "gpt" and "lm_head.weight" in found:  # tied: transformers ignores it
        expected["lm_head.weight"] = expected["transformer.wte.weight"]
    check_tensors({k: v.shape for k, v in found.items()}, expected, where)
    return {ours: found[theirs].T if transposed else found[theirs]
            for ours, (theirs, transposed) in hf_names(cfg).items()}


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
