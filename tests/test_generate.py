"""``hvdllm generate``: cached decoding in both frameworks, against transformers, from checkpoints.

Tiny random models only.  Hugging Face models are built locally from a
config (no download), saved, and imported with ``convert --from-hf``; the
training checkpoint comes from a two-step tp=2 run under mpirun.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hvdllm_cmd, mpirun_prefix, run, run_ok
from hvdllm.cli import main
from hvdllm.common.checkpoint import save_checkpoint
from hvdllm.common.errors import DataError
from hvdllm.common.hf import load_hf_checkpoint
from hvdllm.common.tokenizer import ByteTokenizer
from hvdllm.common.train_checkpoint import read_manifest
from hvdllm.generate import decode, generate_tokens, model_step, read_source, sample_next
from test_hf_interop import FAMILIES, POSITIONS, VOCAB, saved_hf_models

FRAMEWORKS = ["torch", "tensorflow"]
PROMPT = [5, 17, 250, 3, 99, 42]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF model, hvdllm checkpoint directory converted from it).  test_hf_interop's
    random models, with larger weights so that greedy decoding is not a constant token."""
    out = {}
    for family, (hf_dir, model) in saved_hf_models(tmp_path_factory, seed=3, scale=0.3).items():
        ckpt = tmp_path_factory.mktemp(f"ckpt-{family}") / "model"
        save_checkpoint(ckpt, *load_hf_checkpoint(hf_dir))
        out[family] = model, ckpt
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_equals_recompute_and_frameworks_agree(converted, family):
    """Greedy with the cache = greedy recomputing every window, in both frameworks, and past
    seq_len (the sliding window); torch and TensorFlow give the same tokens."""
    source = read_source(converted[family][1])
    new = POSITIONS - len(PROMPT) + 4  # runs past seq_len
    got = {}
    for fw in FRAMEWORKS:
        cached = generate_tokens(source, PROMPT, new, temperature=0, framework=fw)
        plain = generate_tokens(source, PROMPT, new, temperature=0, framework=fw,
                                use_cache=False)
        assert cached == plain, fw
        assert cached[:len(PROMPT)] == PROMPT and len(cached) == len(PROMPT) + new
        got[fw] = cached
    assert got["torch"] == got["tensorflow"]
    # Sampling draws the same tokens from the cached and the recomputed logits.
    sampled = [generate_tokens(source, PROMPT, 12, temperature=1.0, top_k=20, seed=7,
                               use_cache=c) for c in (True, False)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_cached_logits_equal_the_full_forward(converted, family, fw):
    """Prompt once, then one token at a time: each position's logits as the full forward's."""
    source = read_source(converted[family][1])
    cached, full = (model_step(fw, source.model, source.tensors, c) for c in (True, False))
    seq = PROMPT + [7, 1, 299, 64, 2]
    logits, cache = cached(seq[:len(PROMPT)], None)
    for i in range(len(PROMPT), len(seq) + 1):
        np.testing.assert_allclose(logits, full(seq[:i], None)[0], atol=1e-4, rtol=1e-4)
        if i < len(seq):
            logits, cache = cached(seq[i:i + 1], cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(converted, family):
    model, ckpt = converted[family]
    new = POSITIONS - len(PROMPT)  # transformers' GPT-2 has no positions past its table
    with torch.no_grad():
        want = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, attention_mask=torch.ones(1, len(PROMPT),
                                                                            dtype=torch.long))
    want = want[0].tolist()
    source = read_source(ckpt)
    for fw in FRAMEWORKS:
        assert generate_tokens(source, PROMPT, new, temperature=0, framework=fw) == want, fw


def test_cli_greedy_matches_transformers(converted):
    model, ckpt = converted["llama"]
    text = "hi there"
    ids = list(text.encode())
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10,
                              min_new_tokens=10, attention_mask=torch.ones(1, len(ids),
                                                                           dtype=torch.long))
    res = run_ok(hvdllm_cmd("generate", "--checkpoint", str(ckpt), "--prompt", text,
                            "--max-new-tokens", "10", "--temperature", "0"), 120)
    assert res.stdout.rstrip("\n") == ByteTokenizer().decode(want[0].tolist())
    assert res.stdout.startswith(text)


def test_sampler():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    assert sample_next(logits, np.random.default_rng(0), 0.0, 0) == 1
    rng = np.random.default_rng(0)
    draws = {sample_next(logits, rng, 1.0, 2) for _ in range(200)}
    assert draws == {1, 3}  # top-2 only
    a = [sample_next(logits, np.random.default_rng(4), 0.7, 0) for _ in range(5)]
    assert a == [sample_next(logits, np.random.default_rng(4), 0.7, 0) for _ in range(5)]
    # decode feeds the cache only while it fits, then recomputes the last window.
    calls = []

    def step(tokens, cache):
        calls.append((len(tokens), cache is None))
        return np.eye(4)[(tokens[-1] + 1) % 4], "cache"

    assert decode(step, [0, 1], 5, seq_len=4, temperature=0) == [0, 1, 2, 3, 0, 1, 2]
    assert calls == [(2, True), (1, False), (1, False), (4, True), (4, True)]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2-run")
    sets = [f"output.dir={out}", "train.steps=2", "output.checkpoint_every=2",
            "model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.seq_len=32",
            "train.global_batch_size=4", "parallel.tp=2", "train.sample_tokens=0"]
    args = []
    for item in sets:
        args += ["--set", item]
    run_ok(mpirun_prefix(2) + hvdllm_cmd("train", *args), 240)
    return out


def test_tp2_training_checkpoint_in_both_frameworks(tp2_run):
    step_dir = next((tp2_run / "checkpoints").glob("step-*"))
    assert read_manifest(step_dir)["config"]["parallel"]["tp"] == 2
    source = read_source(step_dir)
    assert source.framework == "torch" and source.tokenizer == "bytes"
    prompt = list(b"abc")
    tokens = {fw: generate_tokens(source, prompt, 40, temperature=0, framework=fw)
              for fw in FRAMEWORKS}
    assert tokens["torch"] == tokens["tensorflow"]
    assert tokens["torch"] == generate_tokens(source, prompt, 40, temperature=0,
                                              use_cache=False)
    res = run_ok(hvdllm_cmd("generate", "--checkpoint", str(tp2_run), "--prompt", "abc",
                            "--max-new-tokens", "40", "--temperature", "0",
                            "--framework", "tensorflow"), 120)
    assert res.stdout.rstrip("\n") == ByteTokenizer().decode(tokens["torch"])
    assert res.stdout.startswith("abc")


@pytest.mark.parametrize("extra, fragment", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--prompt", ""], "the prompt is empty"),
    (["--checkpoint", "MISSING"], "not found"),
    (["--checkpoint", "EMPTY"], "is not an hvdllm checkpoint"),
    (["--tokenizer", "MISSING"], "--tokenizer: "),
])
def test_bad_input_is_one_line(converted, tmp_path, capsys, extra, fragment):
    (tmp_path / "empty").mkdir()
    names = {"MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty")}
    extra = [names.get(a, a) for a in extra]
    argv = ["generate", "--checkpoint", str(converted["gpt"][1]), "--prompt", "x"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvdllm: error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1


def test_cli_exit_code_from_a_subprocess(tmp_path):
    res = run(hvdllm_cmd("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"),
              60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"hvdllm: error: checkpoint directory {tmp_path / 'nope'} not found"]


def test_prompt_outside_the_vocabulary(converted):
    source = read_source(converted["gpt"][1])
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        generate_tokens(source, [VOCAB + 1], 1)
    with pytest.raises(DataError, match="the prompt is empty"):
        generate_tokens(source, [], 1)
