"""Tier 1: tokenizers (bytes and a trained BPE) and prepared, memory-mapped corpora."""
import json

import numpy as np
import pytest

from hvdllm.common.errors import ConfigError, DataError
from hvdllm.common.shards import TokenShards, check_tokenizer_matches, is_prepared, prepare
from hvdllm.common.tokenizer import (ByteTokenizer, HFTokenizer, check_vocab, load_tokenizer,
                                     train_bpe)

TEXT_A = "The quick brown fox jumps over the lazy dog.\n" * 40 + "naïve café — ünïcode ✓\n"
TEXT_B = "def f(x):\n    return x * 2\n\n" * 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text(TEXT_B, encoding="utf-8")
    (root / ".hidden").write_text("never read")
    return root


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe([str(corpus)], vocab_size=300, out_dir=out, min_frequency=2)
    return out


def test_bpe_round_trip_and_compression(bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    assert isinstance(tok, HFTokenizer)
    assert 257 <= tok.vocab_size <= 300
    assert tok.eos_id is not None
    for text in (TEXT_A, TEXT_B, "unseen words: zebra 42 ∑"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # merges learned from the corpus: fewer tokens than bytes
    assert len(tok.encode(TEXT_A)) < 0.5 * len(TEXT_A.encode())


def test_bad_tokenizer_specs(tmp_path, bpe_dir):
    with pytest.raises(ConfigError, match="neither"):
        load_tokenizer(str(tmp_path / "nope"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_tokenizer(str(bad))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.vocab_size = 256 is smaller"):
        check_vocab(load_tokenizer(str(bpe_dir)), 256)
    check_vocab(ByteTokenizer(), 256)
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe([str(tmp_path)], vocab_size=100, out_dir=tmp_path / "o")


def expected_byte_stream(corpus) -> np.ndarray:
    parts = [TEXT_A.encode() + b"\n\n", TEXT_B.encode() + b"\n\n"]  # sorted: a.txt, sub/b.txt
    return np.frombuffer(b"".join(parts), np.uint8).astype(np.int64)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_bytes_stream_is_independent_of_workers(corpus, tmp_path, workers):
    index = prepare([str(corpus)], "bytes", tmp_path / "p", workers=workers, piece_bytes=300)
    assert is_prepared(tmp_path / "p")
    assert len(index["shards"]) > 4  # cut into pieces
    assert index["dtype"] == "uint16" and index["documents"] == 2
    shards = TokenShards(tmp_path / "p")
    want = expected_byte_stream(corpus)
    assert len(shards) == len(want) == index["tokens"]
    assert np.array_equal(np.asarray(shards), want)


def test_prepare_bpe_and_random_access(corpus, bpe_dir, tmp_path):
    tok = load_tokenizer(str(bpe_dir))
    prepare([str(corpus)], str(bpe_dir), tmp_path / "p", workers=1, piece_bytes=500)
    shards = TokenShards(tmp_path / "p")
    assert shards.vocab_size == tok.vocab_size
    assert (tmp_path / "p" / "tokenizer.json").is_file()
    stream = np.asarray(shards)
    assert stream.max() < tok.vocab_size
    assert (stream == tok.eos_id).sum() == 2  # one end-of-text per document
    text = tok.decode(stream)
    assert TEXT_A in text and TEXT_B in text
    # 2-D gathers across shard boundaries, and slices as views
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(shards), size=(7, 13))
    assert np.array_equal(shards[idx], stream[idx])
    tail = shards[len(shards) // 2:]
    assert len(tail) == len(stream) - len(stream) // 2
    assert np.array_equal(tail[np.arange(5)], stream[len(stream) // 2:][:5])
    check_tokenizer_matches(shards, str(bpe_dir))
    with pytest.raises(ConfigError, match="not the tokenizer"):
        check_tokenizer_matches(shards, "bytes")


def test_token_windows_over_shards(corpus, tmp_path):
    from hvdllm.common.data import TokenWindows

    prepare([str(corpus)], "bytes", tmp_path / "p", workers=1, piece_bytes=200)
    shards, plain = TokenShards(tmp_path / "p"), expected_byte_stream(corpus)
    a, b = TokenWindows(shards, 16), TokenWindows(plain, 16)
    assert len(a) == len(b)
    idx = np.array([0, 3, len(a) - 1])
    for x, y in zip(a.batch(idx), b.batch(idx)):
        assert np.array_equal(x, y)


def test_damaged_and_empty_corpora(corpus, tmp_path):
    prepare([str(corpus)], "bytes", tmp_path / "p", workers=1, piece_bytes=300)
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    shard = tmp_path / "p" / index["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated") as info:
        TokenShards(tmp_path / "p")
    assert "\n" not in str(info.value)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenShards(tmp_path / "p")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(DataError, match="is empty") as info:
        prepare([str(empty)], "bytes", tmp_path / "q")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="not found"):
        prepare([str(tmp_path / "nothing-here")], "bytes", tmp_path / "q")
    (tmp_path / "notprep").mkdir()
    (tmp_path / "notprep" / "x").write_text("x")
    with pytest.raises(DataError, match="not a prepared corpus"):
        prepare([str(corpus)], "bytes", tmp_path / "notprep")


def test_cli_tokenizer_prepare_train_generate(corpus, tmp_path):
    """The documented path: train a BPE, prepare the corpus with it, train on the shards."""
    from conftest import hvdllm_cmd, read_metrics, run, run_ok

    tok_dir, prep, out = tmp_path / "tok", tmp_path / "prep", tmp_path / "run"
    res = run_ok(hvdllm_cmd("tokenizer", "train", str(corpus), "--vocab-size", "300",
                            "--out", str(tok_dir)), timeout=120)
    assert "vocabulary" in res.stdout and (tok_dir / "tokenizer.json").is_file()
    res = run_ok(hvdllm_cmd("prepare", str(corpus), "--tokenizer", str(tok_dir), "--out",
                            str(prep), "--workers", "2", "--piece-mb", "0.001"), timeout=120)
    assert "tokens (uint16)" in res.stdout
    vocab = load_tokenizer(str(tok_dir)).vocab_size
    common = ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set",
              "model.seq_len=16", "--set", f"model.vocab_size={vocab}", "--set",
              "train.steps=3", "--set", "train.global_batch_size=4", "--set",
              "train.micro_batch_size=2", "--set", f"data.path={json.dumps(str(prep))}"]
    run_ok(hvdllm_cmd("train", *common, "--set", f"data.tokenizer={json.dumps(str(tok_dir))}",
                      "--set", "train.sample_tokens=5", "--set",
                      f"output.dir={json.dumps(str(out))}"), timeout=300)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    # the corpus was made with the BPE, not bytes: one line, exit 2
    bad = run(hvdllm_cmd("train", *common, "--set", f"output.dir={json.dumps(str(out))}"),
              timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "not the tokenizer" in lines[0], bad.stderr
    # a model vocabulary too small for the tokenizer: one line at config time
    small = run(hvdllm_cmd("train", "--set", "model.vocab_size=256", "--set",
                           f"data.tokenizer={json.dumps(str(tok_dir))}"), timeout=60)
    assert small.returncode == 2 and "is smaller than data.tokenizer's vocabulary" in small.stderr
    assert len(small.stderr.strip().splitlines()) == 1


def test_prepare_over_mpi_ranks_matches_one_process(corpus, tmp_path):
    """`mpirun -np 2 hvdllm prepare`: the ranks share the pieces; the stream is the same."""
    from conftest import hvdllm_cmd, mpirun_prefix, run, run_ok

    prepare([str(corpus)], "bytes", tmp_path / "one", workers=1,
            piece_bytes=int(0.0003 * (1 << 20)))  # the --piece-mb below
    res = run_ok(mpirun_prefix(2) + hvdllm_cmd("prepare", str(corpus), "--out",
                                               str(tmp_path / "two"), "--piece-mb", "0.0003"),
                 timeout=120)
    assert res.stdout.count("wrote ") == 1  # rank 0 reports
    one, two = TokenShards(tmp_path / "one"), TokenShards(tmp_path / "two")
    assert len(two.index["shards"]) == len(one.index["shards"])
    assert np.array_equal(np.asarray(one), np.asarray(two))
    # rank 0's refusal reaches every rank: one line, no hang
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    bad = run(mpirun_prefix(2) + hvdllm_cmd("prepare", str(corpus), "--out",
                                            str(tmp_path / "busy")), timeout=120)
    assert bad.returncode != 0 and "not a prepared corpus" in bad.stderr, bad.stderr
