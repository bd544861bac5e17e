"""Tier 1: tokenizer, corpus loading and the DP-sharded sampler."""
import numpy as np
import pytest

from hvdllm.common.data import (ByteTokenizer, ShardedBatchSampler, TokenWindows,
                                bundled_corpus_text, load_tokens)
from hvdllm.common.errors import DataError


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "Hello, wörld — ünïcode ✓"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_bundled_corpus_is_real_english():
    text = bundled_corpus_text()
    assert len(text) > 300_000
    words = text.lower().split()
    for common in ("the", "and", "function", "object"):
        assert words.count(common) > 100
    assert text == bundled_corpus_text()  # deterministic order


def test_load_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("bbb")
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / ".hidden").write_text("zzz")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("ccc")
    assert ByteTokenizer().decode(load_tokens(str(tmp_path / "a.txt"))) == "aaa"
    assert ByteTokenizer().decode(load_tokens(str(tmp_path))) == "aaa\n\nbbb\n\nccc"


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="data.path not found"):
        load_tokens(str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_tokens(str(tmp_path / "empty.txt"))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no files"):
        load_tokens(str(tmp_path / "d"))


def test_corpus_shorter_than_seq_len():
    with pytest.raises(DataError, match="shorter than model.seq_len"):
        TokenWindows(np.arange(10, dtype=np.uint8), seq_len=16)


def test_windows_are_shifted_targets():
    tokens = np.arange(50, dtype=np.uint8)
    win = TokenWindows(tokens, seq_len=8)
    assert len(win) == (50 - 1) // 8
    x, y = win.batch([0, 3])
    assert x.shape == y.shape == (2, 8)
    np.testing.assert_array_equal(x[1], np.arange(24, 32))
    np.testing.assert_array_equal(y[1], np.arange(25, 33))


@pytest.mark.parametrize("n,gbs,mbs,dp", [(37, 8, 2, 2), (40, 8, 1, 4), (13, 12, 3, 2), (5, 4, 4, 1)])
def test_every_sample_once_per_epoch_across_ranks(n, gbs, mbs, dp):
    samplers = [ShardedBatchSampler(n, gbs, mbs, r, dp, seed=7) for r in range(dp)]
    steps = 3 * n // gbs + 2
    stream = []
    for _ in range(steps):
        per_rank = [np.concatenate(s.next_step()) for s in samplers]
        for r in range(dp):
            assert len(per_rank[r]) == gbs // dp
        stream.extend(np.concatenate(per_rank).tolist())
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    # Different epochs are shuffled differently.
    if len(stream) >= 2 * n:
        assert stream[:n] != stream[n:2 * n]


def test_global_batch_independent_of_layout():
    def global_batches(mbs, dp, steps=5):
        samplers = [ShardedBatchSampler(100, 8, mbs, r, dp, seed=3) for r in range(dp)]
        return [sorted(np.concatenate([np.concatenate(s.next_step()) for s in samplers]).tolist())
                for _ in range(steps)]
    ref = global_batches(8, 1)
    assert global_batches(2, 1) == ref
    assert global_batches(2, 2) == ref
    assert global_batches(2, 4) == ref
    assert global_batches(1, 8) == ref


def test_resume_continues_the_stream():
    a = ShardedBatchSampler(50, 6, 3, 1, 2, seed=11)
    for _ in range(7):
        a.next_step()
    state = a.state_dict()
    expected = [np.concatenate(a.next_step()).tolist() for _ in range(5)]
    b = ShardedBatchSampler(50, 6, 3, 1, 2, seed=11)
    b.load_state_dict(state)
    assert [np.concatenate(b.next_step()).tolist() for _ in range(5)] == expected
    c = ShardedBatchSampler(50, 6, 3, 1, 2, seed=12)
    with pytest.raises(DataError, match="saved seed=11"):
        c.load_state_dict(state)
