"""Hugging Face interop and hvdllm's checkpoint format.

Tiny random Hugging Face models are built locally (nothing touches a model
hub), saved with ``save_pretrained`` and read back into hvdllm's reference
models.  Logits are compared on the same random tokens with the absolute
maximum difference, which must stay under ``ATOL`` while the logits
themselves are of order one.
"""
import dataclasses
import json
import shutil
import sys
import tomllib

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from conftest import hvdllm_cmd, run, run_ok
from hvdllm.common.checkpoint import (load_checkpoint, parameter_shapes, read_safetensors,
                                      save_checkpoint, write_safetensors)
from hvdllm.common.config import Config, ModelConfig
from hvdllm.common.errors import CheckpointError
from hvdllm.common.hf import load_hf_checkpoint, model_config_from_hf, read_hf_tensors
from hvdllm.torch.engine import build_model
from hvdllm.torch.hf import export_hf, init_from, state_dict_numpy

ATOL = 1e-4
VOCAB, POSITIONS, TOKENS = 320, 32, 24
FAMILIES = ["gpt", "llama"]


def hf_config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    if family == "gpt":
        return GPT2Config(n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=POSITIONS, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)


def random_hf_model(family: str, seed: int = 0, scale: float = 0.1):
    """A fp32 HF model whose every parameter is random (norm gains too, to catch swaps)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0
            p.copy_(gain + scale * torch.randn_like(p))
    return model.eval()


def saved_hf_models(tmp_path_factory, seed: int = 0, scale: float = 0.1) -> dict:
    """family -> (HF directory, HF model): a random model of each family, saved."""
    out = {}
    for family in FAMILIES:
        model = random_hf_model(family, seed, scale)
        path = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(path)
        out[family] = path, model
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (HF directory, HF model), saved once per module."""
    return saved_hf_models(tmp_path_factory)


@pytest.fixture(params=FAMILIES)
def saved(request, hf_dirs):
    """(family, HF directory, HF model) for each family."""
    return (request.param, *hf_dirs[request.param])


def tokens(seed: int = 1, length: int = TOKENS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hvdllm_logits(model, idx: torch.Tensor) -> torch.Tensor:
    return model.eval()(idx)


@torch.no_grad()
def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    return model.eval()(idx).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def loaded_model(spec: str, cfg: ModelConfig):
    model = build_model(Config(model=cfg))
    init_from(model, spec, cfg)
    return model


def fmt(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("hvdllm: error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def rewrite_tensors(src, dst, edit) -> None:
    """Copy HF directory ``src`` to ``dst`` with its tensors passed through ``edit``."""
    shutil.copytree(src, dst)
    tensors = {k: np.array(v) for k, v in read_safetensors(src / "model.safetensors").items()}
    edit(tensors)
    (dst / "model.safetensors").unlink()
    write_safetensors(dst / "model.safetensors", tensors, {"format": "pt"})


# ---------------------------------------------------------------- names and configs

@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_shapes_name_every_model_parameter(family):
    cfg = ModelConfig(family=family, n_layer=3, n_head=4, n_kv_head=2 if family == "llama" else 0,
                      d_model=32, d_ff=48, seq_len=16, vocab_size=300)
    model = build_model(Config(model=cfg))
    assert parameter_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_hf_configs_convert_to_model_sections(saved):
    family, path, _ = saved
    cfg, _ = load_hf_checkpoint(path)
    assert (cfg.family, cfg.n_layer, cfg.n_head, cfg.d_model) == (family, 2, 4, 64)
    assert (cfg.ff_width, cfg.seq_len, cfg.vocab_size, cfg.norm_eps) == (96, POSITIONS, VOCAB, 1e-5)
    if family == "llama":
        assert (cfg.kv_heads, cfg.rope_theta) == (2, 500.0)


def test_old_style_configs_are_accepted():
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()
    del llama["rope_parameters"]
    llama["rope_theta"], llama["rope_scaling"] = 500000.0, None
    assert model_config_from_hf(llama).rope_theta == 500000.0
    gpt2 = GPT2Config(n_embd=64, n_head=4).to_dict()
    gpt2["n_inner"] = None
    assert model_config_from_hf(gpt2).ff_width == 4 * 64


@pytest.mark.parametrize("family, change, fragment", [
    ("gpt", {"activation_function": "relu"}, 'activation_function="relu" is not supported'),
    ("gpt", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
    ("gpt", {"tie_word_embeddings": False}, "tie_word_embeddings=false"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope type 'linear' is not supported"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope type 'dynamic' is not supported"),
    ("llama", {"attention_bias": True}, "attention_bias=true is not supported"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true is not supported"),
    ("llama", {"tie_word_embeddings": True}, "tie_word_embeddings=true is not supported"),
    ("llama", {"hidden_act": "gelu"}, 'hidden_act="gelu" is not supported'),
    ("llama", {"model_type": "bert"}, 'model_type "bert" is not supported'),
])
def test_unsupported_hf_configs_are_refused(family, change, fragment):
    hf = hf_config(family).to_dict()
    hf.update(change)
    with pytest.raises(CheckpointError, match="config.json") as info:
        model_config_from_hf(hf)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- logits

def test_hf_import_gives_the_same_logits(saved):
    family, path, hf_model = saved
    cfg, _ = load_hf_checkpoint(path)
    model = build_model(Config(model=cfg))
    idx = tokens()
    reference = hf_logits(hf_model, idx)
    assert max_diff(hvdllm_logits(model, idx), reference) > 0.1  # before loading: unrelated
    init_from(model, f"hf:{path}", cfg)
    diff = max_diff(hvdllm_logits(model, idx), reference)
    print(f"\n{family}: max |hvdllm - HF| logit difference {diff:.2e} "
          f"(logits up to {reference.abs().max().item():.2f})")
    assert reference.std().item() > 0.1
    assert diff < ATOL


def test_seq_len_may_differ_where_no_tensor_depends_on_it(saved):
    family, path, hf_model = saved
    cfg, _ = load_hf_checkpoint(path)
    idx = tokens(length=16)
    short = loaded_model(f"hf:{path}", dataclasses.replace(cfg, seq_len=16))
    assert max_diff(hvdllm_logits(short, idx), hf_logits(hf_model, idx)) < ATOL
    longer = dataclasses.replace(cfg, seq_len=64)
    if family == "gpt":  # the position table has only 32 rows
        with pytest.raises(CheckpointError, match="model.seq_len is 32 in the checkpoint .* but "
                                                  "64 in the config"):
            loaded_model(f"hf:{path}", longer)
    else:  # rotary positions have no table
        model = loaded_model(f"hf:{path}", longer)
        assert max_diff(hvdllm_logits(model, idx), hf_logits(hf_model, idx)) < ATOL


def test_export_round_trip_through_transformers(saved, tmp_path):
    family, path, hf_model = saved
    cfg, _ = load_hf_checkpoint(path)
    model = loaded_model(f"hf:{path}", cfg)
    export_hf(model, cfg, tmp_path / "out")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    idx = tokens(seed=2)
    diff = max_diff(hf_logits(reloaded, idx), hvdllm_logits(model, idx))
    print(f"\n{family}: max |exported HF - hvdllm| logit difference {diff:.2e}")
    assert diff < ATOL
    original, exported = read_hf_tensors(path), read_hf_tensors(tmp_path / "out")
    assert set(original) == set(exported)
    for name in original:
        np.testing.assert_array_equal(original[name], exported[name], err_msg=name)


def test_export_accepts_a_full_state_dict(saved, tmp_path):
    family, path, _ = saved
    cfg, _ = load_hf_checkpoint(path)
    model = loaded_model(f"hf:{path}", cfg)
    export_hf(model.state_dict(), cfg, tmp_path / "out")  # gpt: lm_head.weight included
    assert set(read_hf_tensors(tmp_path / "out")) == set(read_hf_tensors(path))


def test_init_from_hvdllm_checkpoint(saved, tmp_path):
    family, path, hf_model = saved
    cfg, tensors = load_hf_checkpoint(path)
    save_checkpoint(tmp_path / "ckpt", cfg, tensors)
    model = loaded_model(str(tmp_path / "ckpt"), cfg)
    idx = tokens(seed=3)
    assert max_diff(hvdllm_logits(model, idx), hf_logits(hf_model, idx)) < ATOL
    for name, value in state_dict_numpy(model).items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)


# ---------------------------------------------------------------- the CLI

def test_cli_convert_both_ways(saved, tmp_path):
    family, path, hf_model = saved
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    res = run_ok(hvdllm_cmd("convert", "--from-hf", str(path), "--out", str(ckpt)), timeout=120)
    assert f"wrote hvdllm checkpoint {ckpt}: {family}, 2 layers" in res.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "model.toml"]
    assert set(tomllib.loads((ckpt / "model.toml").read_text())) == {"model"}
    cfg, tensors = load_checkpoint(ckpt)
    assert cfg == load_hf_checkpoint(path)[0]
    if family == "gpt":
        assert "lm_head.weight" not in tensors and "wte.weight" in tensors
    # --to-hf from a process that must not import any framework.
    script = ("import sys; from hvdllm.cli import main; rc = main(sys.argv[1:]); "
              "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules, 'framework'; "
              "sys.exit(rc)")
    run_ok([sys.executable, "-c", script, "convert", "--to-hf", str(ckpt), "--out", str(back)],
           timeout=120)
    assert json.loads((back / "config.json").read_text())["model_type"] == hf_config(
        family).model_type
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    idx = tokens(seed=4)
    assert max_diff(hf_logits(reloaded, idx), hf_logits(hf_model, idx)) == 0.0


def test_cli_errors_are_one_line(saved, tmp_path):
    family, path, _ = saved
    line = one_line_error(run(hvdllm_cmd("convert", "--from-hf", str(tmp_path / "none"),
                                         "--out", str(tmp_path / "x")), timeout=120))
    assert f"{tmp_path / 'none'} not found" in line
    line = one_line_error(run(hvdllm_cmd("convert", "--to-hf", str(path), "--out",
                                         str(tmp_path / "x")), timeout=120))
    assert "model.toml is missing" in line and f"hf:{path}" in line
    line = one_line_error(run(hvdllm_cmd("convert", "--from-hf", str(path), "--out",
                                         str(path)), timeout=120))
    assert "already exists and is not an empty directory" in line
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- mismatches

def test_missing_unexpected_and_misshapen_tensors_are_named(saved, tmp_path):
    family, path, _ = saved
    if family == "gpt":
        gone, gone_shape = "transformer.h.1.mlp.c_fc.weight", "(64, 96)"
        # c_attn in nn.Linear's (out, in) layout instead of Conv1D's (in, out)
        bent = "transformer.h.0.attn.c_attn.weight"
        bent_expected, bent_found = (64, 192), (192, 64)
    else:
        gone, gone_shape = "model.layers.1.mlp.up_proj.weight", "(96, 64)"
        bent = "model.layers.0.self_attn.k_proj.weight"
        bent_expected, bent_found = (32, 64), (64, 64)  # as many kv heads as query heads
    bent_text = f"tensor '{bent}': expected shape {fmt(bent_expected)}, found {fmt(bent_found)}"

    def edit(t):
        del t[gone]
        t["transformer.extra.weight"] = np.zeros((3, 5), np.float32)
        t[bent] = np.zeros(bent_found, np.float32)

    rewrite_tensors(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(tmp_path / "bad")
    message = str(info.value)
    assert f"tensor '{gone}': expected shape {gone_shape}, found none (missing)" in message
    assert ("tensor 'transformer.extra.weight': expected none (unexpected), found shape (3, 5)"
            in message)
    assert bent_text in message
    line = one_line_error(run(hvdllm_cmd("convert", "--from-hf", str(tmp_path / "bad"), "--out",
                                         str(tmp_path / "ckpt")), timeout=120))
    assert bent_text in line
    assert not (tmp_path / "ckpt").exists()


def test_gpt2_without_prefix_and_with_mask_buffers(hf_dirs, tmp_path):
    path, _ = hf_dirs["gpt"]

    def edit(t):
        for name in list(t):
            t[name.removeprefix("transformer.")] = t.pop(name)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, POSITIONS, POSITIONS), np.float32))
        t["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
        t["lm_head.weight"] = t["wte.weight"]

    rewrite_tensors(path, tmp_path / "old", edit)
    _, plain = load_hf_checkpoint(path)
    _, old = load_hf_checkpoint(tmp_path / "old")
    assert set(old) == set(plain)
    for name in plain:
        np.testing.assert_array_equal(old[name], plain[name], err_msg=name)


def test_config_mismatch_names_each_field(saved):
    family, path, _ = saved
    cfg, _ = load_hf_checkpoint(path)
    other = dataclasses.replace(cfg, d_model=32, n_layer=3, norm_eps=1e-6)
    with pytest.raises(CheckpointError) as info:
        loaded_model(f"hf:{path}", other)
    message = str(info.value)
    assert f"checkpoint hf:{path} does not fit the [model] config" in message
    assert "model.d_model is 64 in the checkpoint but 32 in the config" in message
    assert "model.n_layer is 2 in the checkpoint but 3 in the config" in message
    assert "model.norm_eps is 1e-05 in the checkpoint but 1e-06 in the config" in message
    assert "n_head" not in message and "vocab_size" not in message


def test_sharded_checkpoint_reads_like_one_file(saved, tmp_path):
    family, path, hf_model = saved
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, whole = load_hf_checkpoint(path)
    _, sharded = load_hf_checkpoint(tmp_path)
    assert set(whole) == set(sharded)
    for name in whole:
        np.testing.assert_array_equal(whole[name], sharded[name], err_msg=name)


def test_bfloat16_checkpoint_is_widened_to_float32(tmp_path):
    model = random_hf_model("llama", seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, tensors = load_hf_checkpoint(tmp_path)
    expected = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()
    got = tensors["blocks.1.attn.wk.weight"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- hvdllm's own format

def test_checkpoint_stores_the_tied_head_once_and_the_model_section(tmp_path):
    plain = ModelConfig(n_layer=1, d_model=32, seq_len=16)
    model = build_model(Config(model=plain))
    cfg = dataclasses.replace(plain, init_from="hf:/elsewhere")
    save_checkpoint(tmp_path / "c", cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    assert "lm_head.weight" not in read_safetensors(tmp_path / "c" / "model.safetensors")
    assert "init_from" not in tomllib.loads((tmp_path / "c" / "model.toml").read_text())["model"]
    loaded_cfg, tensors = load_checkpoint(tmp_path / "c")
    assert loaded_cfg == plain
    assert set(tensors) == set(parameter_shapes(cfg))
    untied = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    untied["lm_head.weight"] += 1.0
    with pytest.raises(CheckpointError, match="lm_head.weight is tied to wte.weight"):
        save_checkpoint(tmp_path / "d", cfg, untied)


def test_checkpoint_shape_mismatch_is_named(tmp_path):
    cfg = ModelConfig(family="llama", n_layer=1, n_kv_head=2, d_model=32, seq_len=16)
    tensors = state_dict_numpy(build_model(Config(model=cfg)))
    save_checkpoint(tmp_path / "c", cfg, tensors)
    tensors["blocks.0.attn.wk.weight"] = np.zeros((32, 32), np.float32)
    (tmp_path / "c" / "model.safetensors").unlink()
    write_safetensors(tmp_path / "c" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"tensor 'blocks.0.attn.wk.weight': expected shape "
                                              r"\(16, 32\), found \(32, 32\)"):
        load_checkpoint(tmp_path / "c")


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import hvdllm.common.checkpoint as checkpoint

    def crash(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_text_synced", crash)
    cfg = ModelConfig(n_layer=1, d_model=32, seq_len=16)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", cfg, state_dict_numpy(build_model(Config(model=cfg))))
    assert list(tmp_path.iterdir()) == []


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory .*nowhere not found"):
        load_checkpoint(tmp_path / "nowhere")
    cfg = ModelConfig(n_layer=1, d_model=32, seq_len=16)
    save_checkpoint(tmp_path / "c", cfg, state_dict_numpy(build_model(Config(model=cfg))))
    weights = tmp_path / "c" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="does not fit its byte range .*file truncated"):
        load_checkpoint(tmp_path / "c")
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_checkpoint(tmp_path / "c")
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "model.toml").write_text("[model]\nn_layers = 1\n")
    with pytest.raises(CheckpointError, match="model.toml: unknown config key 'model.n_layers'"):
        load_checkpoint(tmp_path / "c")
