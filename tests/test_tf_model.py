"""The Keras GPT and the TensorFlow engine in one process (no MPI launch)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvdllm.common.config import build_config  # noqa: E402
from hvdllm.tensorflow.models import (  # noqa: E402
    GPT, MLP, CausalSelfAttention, Llama, LlamaAttention, LlamaBlock, PositionEmbedding, RMSNorm,
    SwiGLU, TransformerBlock)

# Deliberately not the defaults, so a hyperparameter that get_config drops shows up.
VOCAB, SEQ_LEN, D_MODEL, N_HEAD, N_LAYER = 300, 16, 32, 2, 3
GPT_KWARGS = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, n_layer=N_LAYER, n_head=N_HEAD,
                  d_model=D_MODEL, init_std=0.05)

LAYERS = [
    (PositionEmbedding, dict(seq_len=SEQ_LEN, init_std=0.3), "hidden"),
    (CausalSelfAttention, dict(d_model=D_MODEL, n_head=N_HEAD, init_std=0.1,
                               proj_init_std=0.2), "hidden"),
    (MLP, dict(d_model=D_MODEL, init_std=0.1, proj_init_std=0.2), "hidden"),
    (TransformerBlock, dict(d_model=D_MODEL, n_head=N_HEAD, init_std=0.1,
                            proj_init_std=0.2), "hidden"),
    (GPT, GPT_KWARGS, "tokens"),
    (RMSNorm, dict(eps=1e-4), "hidden"),
    (SwiGLU, dict(d_model=D_MODEL, d_ff=48, init_std=0.1, proj_init_std=0.2), "hidden"),
    (LlamaAttention, dict(d_model=D_MODEL, n_head=4, n_kv_head=2, seq_len=SEQ_LEN,
                          rope_theta=500.0, init_std=0.1, proj_init_std=0.2), "hidden"),
    (LlamaBlock, dict(d_model=D_MODEL, n_head=4, d_ff=48, n_kv_head=2, seq_len=SEQ_LEN,
                      rope_theta=500.0, norm_eps=1e-4, init_std=0.1, proj_init_std=0.2),
     "hidden"),
    (Llama, dict(vocab_size=VOCAB, seq_len=SEQ_LEN, n_layer=N_LAYER, n_head=4, n_kv_head=2,
                 d_model=D_MODEL, d_ff=48, init_std=0.05, norm_eps=1e-4, rope_theta=500.0),
     "tokens"),
]


def _tokens(batch: int = 2, t: int = SEQ_LEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, t)).astype(np.int64)


def _input(kind: str) -> np.ndarray:
    if kind == "tokens":
        return _tokens()
    return np.random.default_rng(1).normal(size=(2, SEQ_LEN, D_MODEL)).astype(np.float32)


def _gpt(seed: int = 7) -> GPT:
    keras.utils.set_random_seed(seed)
    model = GPT(**GPT_KWARGS)
    model.build((None, SEQ_LEN))
    return model


@pytest.mark.parametrize("cls,kwargs,kind", LAYERS, ids=[c.__name__ for c, _, _ in LAYERS])
def test_serialization_round_trip(cls, kwargs, kind):
    x = _input(kind)
    layer = cls(**kwargs, name="original")
    want = keras.ops.convert_to_numpy(layer(x))
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is cls
    assert restored.get_config() == config
    restored(x)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(x)), want, rtol=1e-6, atol=1e-6)


def test_output_shape():
    logits = _gpt()(_tokens(batch=3, t=10))
    assert tuple(logits.shape) == (3, 10, VOCAB)


def test_sequence_longer_than_seq_len_is_rejected():
    with pytest.raises(ValueError, match="exceeds seq_len"):
        _gpt()(_tokens(t=SEQ_LEN + 1))


def test_head_is_tied_to_token_embedding():
    model = _gpt()
    # Only the token embedding may hold a vocabulary-sized matrix.
    vocab_sized = [v.path for v in model.trainable_variables if VOCAB in v.shape]
    assert vocab_sized == [model.token_embedding.embeddings.path]
    # A token's logit is its embedding row dotted with the final hidden state,
    # so a zero row gives a logit of exactly zero everywhere.
    table = model.token_embedding.embeddings.numpy()
    unused = VOCAB - 1
    table[unused] = 0.0
    model.token_embedding.embeddings.assign(table)
    x = _tokens() % unused
    logits = keras.ops.convert_to_numpy(model(x))
    assert np.all(logits[..., unused] == 0.0)
    assert np.all(np.abs(logits[..., :unused]).max(axis=-1) > 0.0)


def test_causal():
    model = _gpt()
    x = _tokens()
    changed = x.copy()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB
    a = keras.ops.convert_to_numpy(model(x))
    b = keras.ops.convert_to_numpy(model(changed))
    np.testing.assert_allclose(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert np.abs(a[:, 9:] - b[:, 9:]).max(axis=-1).min() > 1e-6


def test_residual_projections_are_scaled_down():
    model = _gpt()
    std = {v.path: float(np.std(v.numpy())) for v in model.trainable_variables}
    proj = [s for p, s in std.items() if p.endswith("proj/kernel")]
    fc = [s for p, s in std.items() if p.endswith("fc/kernel")]
    assert len(proj) == 2 * N_LAYER
    want = 0.05 / np.sqrt(2 * N_LAYER)
    assert all(abs(s - want) < 0.15 * want for s in proj)
    assert all(abs(s - 0.05) < 0.15 * 0.05 for s in fc)


def test_same_seed_same_weights():
    a, b, c = _gpt(seed=3), _gpt(seed=3), _gpt(seed=4)
    for va, vb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(a.token_embedding.embeddings.numpy(),
                              c.token_embedding.embeddings.numpy())


def test_generate_is_seeded():
    model = _gpt()
    prompt = np.array([1, 2, 3])
    out = model.generate(prompt, 20, seed=5)
    assert out.shape == (23,) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:3], prompt)
    assert out.min() >= 0 and out.max() < VOCAB
    np.testing.assert_array_equal(out, model.generate(prompt, 20, seed=5))


# -- engine on a world of one -------------------------------------------------

@pytest.fixture(scope="module")
def groups():
    from mpi4py import MPI

    from hvdllm.common.topology import Topology
    from hvdllm.tensorflow.distributed import init_groups

    from conftest import preserved_launch_env
    with preserved_launch_env():  # its Horovod settings must not reach later subprocesses
        yield init_groups(Topology(1, 1, 1), MPI.COMM_WORLD, 60.0)


def _engine(groups, micro_batch_size: int, weight_decay: float = 0.1, **parallel):
    from hvdllm.tensorflow.engine import build_engine

    cfg = build_config({"model": {"seq_len": SEQ_LEN, "d_model": D_MODEL, "n_head": N_HEAD},
                        "train": {"framework": "tensorflow", "global_batch_size": 4,
                                  "micro_batch_size": micro_batch_size,
                                  "weight_decay": weight_decay},
                        "parallel": parallel})
    return build_engine(cfg, groups, threads=2)


def _global_batch() -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(2).integers(0, 256, (4, SEQ_LEN + 1)).astype(np.int64)
    return tokens[:, :-1], tokens[:, 1:]


def test_engine_steps_reduce_loss(groups):
    engine = _engine(groups, micro_batch_size=4)
    assert engine.num_params == sum(int(np.prod(v.shape)) for v in engine.model.trainable_variables)
    batch = [_global_batch()]
    def checksum():
        return float(sum(np.sum(v.numpy(), dtype=np.float64) for v in engine.variables))

    start = checksum()
    losses = [engine.train_step(batch, 3e-3) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.3
    assert checksum() != start
    assert engine._accumulate.experimental_get_tracing_count() == 1


def test_engine_accumulation_matches_one_big_batch(groups):
    x, y = _global_batch()
    whole = _engine(groups, micro_batch_size=4)
    split = _engine(groups, micro_batch_size=2)
    for lr in (1e-3, 2e-3, 3e-3):
        loss_whole = whole.train_step([(x, y)], lr)
        loss_split = split.train_step([(x[:2], y[:2]), (x[2:], y[2:])], lr)
        assert loss_split == pytest.approx(loss_whole, rel=1e-5)
    # Adam divides by the gradient's own scale, so a coordinate whose
    # gradient is almost zero turns rounding noise into a step of up to lr;
    # 1e-5 (1% of lr) still catches any real accumulation error.
    for a, b in zip(whole.model.get_weights(), split.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_engine_weight_decay_spares_vectors(groups):
    # lr * weight_decay = 0.1 shrinks every decayed weight by 10%, while
    # Adam's own step moves each weight by about lr = 1e-6 only.
    engine = _engine(groups, micro_batch_size=4, weight_decay=1e5)
    before = {v.path: v.numpy() for v in engine.model.trainable_variables}
    engine.train_step([_global_batch()], 1e-6)
    for v in engine.model.trainable_variables:
        old, new = before[v.path], v.numpy()
        if old.ndim >= 2:
            np.testing.assert_allclose(new, 0.9 * old, atol=1e-5)
        else:
            np.testing.assert_allclose(new, old, atol=1e-5)


def test_engine_recompute_runs_every_block_twice_with_the_same_result(groups):
    """parallel.recompute = "full" (no pipeline): same loss and weights, blocks rerun in backward."""
    plain = _engine(groups, micro_batch_size=2)
    again = _engine(groups, micro_batch_size=2, recompute="full")
    assert again.model.recompute and not plain.model.recompute
    traced = {"plain": [], "again": []}
    for name, engine in (("plain", plain), ("again", again)):
        for block in engine.model.blocks:
            original = block.call
            block.call = (lambda *a, _o=original, _b=block, _t=traced[name], **k:
                          _t.append(_b.name) or _o(*a, **k))
    x, y = _global_batch()
    for lr in (1e-3, 2e-3):
        batch = [(x[:2], y[:2]), (x[2:], y[2:])]
        assert again.train_step(batch, lr) == pytest.approx(plain.train_step(batch, lr),
                                                            rel=1e-6)
    for a, b in zip(plain.model.get_weights(), again.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Each block is traced in forward; with recompute again inside its backward.
    for block in again.model.blocks:
        n = traced["plain"].count(block.name)
        assert n > 0 and traced["again"].count(block.name) == 2 * n, traced
