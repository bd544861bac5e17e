"""One model contract, two frameworks: the same weights give the same function (GPT, LLaMA).

The torch reference model is built from a config, its parameters (logical
tensors) are loaded into the Keras model by name, and the logits are compared.
An hvdllm checkpoint written from the torch model is also started from with
``model.init_from`` by the TensorFlow engine.
"""
from __future__ import annotations

import numpy as np
import pytest

from hvdllm.common.config import build_config

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

SHAPES = {
    "gpt": {},
    "gpt-awkward": {"n_layer": 3, "d_model": 48, "n_head": 6, "d_ff": 80, "norm_eps": 1e-6,
                    "vocab_size": 259, "seq_len": 24},
    "llama": {"family": "llama"},
    "llama-gqa-awkward": {"family": "llama", "n_layer": 3, "d_model": 48, "n_head": 6,
                          "n_kv_head": 2, "d_ff": 80, "norm_eps": 1e-6, "vocab_size": 259,
                          "seq_len": 24, "rope_theta": 500.0},
}


def _models(model_keys: dict):
    from hvdllm.tensorflow.engine import build_model as build_tf
    from hvdllm.torch.engine import build_model as build_torch

    cfg = build_config({"model": model_keys, "train": {"seed": 7}})
    torch_model = build_torch(cfg)
    tf_model = build_tf(build_config({"model": model_keys, "train": {"framework": "tensorflow"}}))
    return cfg, torch_model, tf_model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_torch_and_keras_gpt_agree_on_the_same_weights(shape):
    from hvdllm.common.family import family_spec
    from hvdllm.tensorflow.state import assign_logical
    from hvdllm.torch.hf import state_dict_numpy

    cfg, torch_model, tf_model = _models(SHAPES[shape])
    tensors = state_dict_numpy(torch_model)
    assign_logical(tf_model, family_spec(cfg.model), tensors, "torch model")
    idx = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    with torch.no_grad():
        want = torch_model(torch.from_numpy(idx)).numpy()
    got = tf_model(tf.constant(idx), training=False).numpy()
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{shape}: max relative difference {err:.2e}"


@pytest.mark.parametrize("shape", ["gpt-awkward", "llama-gqa-awkward"])
def test_keras_model_starts_from_a_torch_checkpoint(shape, tmp_path):
    from hvdllm.common.checkpoint import save_checkpoint
    from hvdllm.tensorflow.engine import build_model as build_tf
    from hvdllm.torch.hf import state_dict_numpy

    keys = SHAPES[shape]
    cfg, torch_model, _ = _models(keys)
    save_checkpoint(tmp_path / "ckpt", cfg.model, state_dict_numpy(torch_model))
    tf_cfg = build_config({"model": dict(keys, init_from=str(tmp_path / "ckpt")),
                           "train": {"framework": "tensorflow"}})
    tf_model = build_tf(tf_cfg)
    idx = np.arange(2 * keys["seq_len"]).reshape(2, -1) % keys["vocab_size"]
    with torch.no_grad():
        want = torch_model(torch.from_numpy(idx)).numpy()
    got = tf_model(tf.constant(idx), training=False).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    # A config that does not fit the checkpoint is refused, naming the field.
    from hvdllm.common.errors import CheckpointError

    bad = build_config({"model": dict(keys, d_ff=96, init_from=str(tmp_path / "ckpt")),
                        "train": {"framework": "tensorflow"}})
    with pytest.raises(CheckpointError, match="model.d_ff is 80 in the checkpoint but 96"):
        build_tf(bad)


@pytest.mark.parametrize("first,then,family", [("torch", "tensorflow", "gpt"),
                                               ("tensorflow", "torch", "llama")])
def test_a_run_continues_in_the_other_framework(first, then, family, tmp_path):
    """A training checkpoint (model and AdamW state) written by one framework resumes in the other."""
    from conftest import hvdllm_cmd, read_metrics, run_ok

    def train(out, framework, steps, *extra):
        sets = [f"output.dir={out}", f"train.steps={steps}", f"train.framework={framework}",
                f"model.family={family}", "model.d_model=32", "model.seq_len=32", *extra]
        return run_ok(hvdllm_cmd("train", *[a for s in sets for a in ("--set", s)]), 300)

    train(tmp_path / "ref", first, 8)
    train(tmp_path / "part", first, 4)
    res = train(tmp_path / "cont", then, 8, f"train.resume={tmp_path / 'part'}")
    assert f"saved by {first}, continued in {then}" in res.stdout, res.stdout[-2000:]
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref")}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cont")}
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4), (step, loss, want[step])
