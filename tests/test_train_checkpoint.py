"""The training-checkpoint format: commit atomicity, faults while saving, reassembly of shards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run
from hvdllm.common.errors import CheckpointError
from hvdllm.common.family import Split, shard
from hvdllm.common.train_checkpoint import (CheckpointReader, list_checkpoints, newest_usable,
                                            verify)

SCRIPT = REPO / "tests" / "mpi_scripts" / "checkpoint_writer.py"


def _write(out: Path, mode: str):
    return run([sys.executable, str(SCRIPT), str(out), mode], timeout=120)


def _value(path: Path) -> float:
    return float(CheckpointReader(path).logical("param", "w")[0])


def test_saves_commit_and_keep_the_newest(tmp_path):
    res = _write(tmp_path, "ok")
    assert res.returncode == 0, res.stderr
    found = newest_usable(tmp_path)
    assert found is not None and found[0].name == "step-00000002"
    assert _value(found[0]) == 2.0
    manifest = verify(found[0])
    assert manifest["step"] == 2 and set(manifest["files"]) == {"rank-00000.safetensors"}
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 1]
    # The rank files are standard safetensors.
    from safetensors.numpy import load_file

    loaded = load_file(str(found[0] / "rank-00000.safetensors"))
    np.testing.assert_array_equal(loaded["param/w/tp0"], np.full(1000, 2.0, np.float32))


def test_state_copies_reuse_the_previous_buffers():
    from hvdllm.common.train_checkpoint import Piece, RankState

    buffers: dict = {}
    first = RankState(buffers=buffers)
    first.add(Piece("w", "param"), np.ones(4, np.float32))
    second = RankState(buffers=buffers)
    source = np.full(4, 3.0, np.float32)
    second.add(Piece("w", "param"), source)
    assert second.pieces[0][1] is first.pieces[0][1]  # the same buffer, refilled
    assert second.pieces[0][1] is not source and second.pieces[0][1][0] == 3.0
    source[0] = 7.0  # training goes on: the copy does not change
    assert second.pieces[0][1][0] == 3.0


def test_crash_between_shard_write_and_commit_keeps_the_previous_checkpoint(tmp_path):
    res = _write(tmp_path, "crash-commit")
    assert res.returncode == 9, (res.returncode, res.stderr)
    root = tmp_path / "checkpoints"
    staging = [p for p in root.iterdir() if p.name.startswith(".staging")]
    assert staging and (staging[0] / "rank-00000.safetensors").exists()  # the shard was written
    assert [s for s, _ in list_checkpoints(root)] == [1]
    found = newest_usable(tmp_path)
    assert found is not None and found[0].name == "step-00000001" and _value(found[0]) == 1.0


def test_write_error_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    res = _write(tmp_path, "disk-full")
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("error:")][0]
    assert "rank-00000.safetensors" in line and str(tmp_path) in line, line
    assert "previous checkpoints are intact" in line
    root = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [1]
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]
    assert _value(newest_usable(tmp_path)[0]) == 1.0


def test_damage_is_named_and_skipped(tmp_path):
    assert _write(tmp_path, "ok").returncode == 0
    newest = tmp_path / "checkpoints" / "step-00000002"
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["rank-00000.safetensors"]["crc32"] ^= 1
    (newest / "manifest.json").write_text(json.dumps(manifest))
    warnings = []
    found = newest_usable(tmp_path, warn=warnings.append)
    assert found[0].name == "step-00000001"
    assert len(warnings) == 1 and "rank-00000.safetensors fails its checksum" in warnings[0]
    (newest / "manifest.json").write_text("{not json")
    warnings.clear()
    assert newest_usable(tmp_path, warn=warnings.append)[0].name == "step-00000001"
    assert "manifest.json is unreadable or corrupt" in warnings[0]
    with pytest.raises(CheckpointError, match="missing"):
        verify(tmp_path / "checkpoints" / "nothing")


@pytest.mark.parametrize("split,shape", [
    (Split.column(parts=3), (12, 4)),
    (Split.row(), (4, 8)),
    (Split.vocab(full_rows=7), (7, 4)),
])
def test_reader_reassembles_tp_shards_and_flat_ranges(tmp_path, split, shape):
    """Pieces written as TP shards, some cut into ZeRO-style flat ranges, give the full tensor."""
    from mpi4py import MPI

    from hvdllm.common.checkpoint_writer import CheckpointManager
    from hvdllm.common.train_checkpoint import Piece, RankState

    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    state = RankState()
    for r in range(2):
        piece = shard(full, split, r, 2)
        if r == 0:
            state.add(Piece("t", "param", split.to_dict(), r, 2), piece)
        else:  # three flat ranges, as ZeRO-1 partitions save them
            flat, n = piece.reshape(-1), piece.size
            cuts = [0, n // 3, 2 * n // 3, n]
            for lo, hi in zip(cuts, cuts[1:]):
                state.add(Piece("t", "param", split.to_dict(), r, 2, (lo, hi), piece.shape),
                          flat[lo:hi])
    state.shared.update(step=1)
    manager = CheckpointManager(tmp_path, MPI.COMM_SELF, 1, {}, {"dp": 1, "tp": 2, "pp": 1},
                                "torch", 30)
    path = manager.save(1, state, blocking=True)
    manager.close()
    np.testing.assert_array_equal(CheckpointReader(path).logical("param", "t"), full)
