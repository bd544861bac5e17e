"""Horovod settings and config checks behind the data-parallel sync (no MPI needed)."""
from __future__ import annotations

import os

import pytest

from hvdllm.common.config import build_config
from hvdllm.common.errors import ConfigError
from hvdllm.common.launch import configure_horovod_env, horovod_carries_gradients

KEYS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_STALL_CHECK_TIME_SECONDS",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")


@pytest.fixture
def clean_env(monkeypatch):
    for key in KEYS:
        # setenv first so that monkeypatch restores the key on teardown even when
        # it was unset (delenv of a missing key records nothing to undo).
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def test_data_parallel_defaults(clean_env):
    configure_horovod_env(30.0, data_parallel=True, fusion_bytes=4 * 2**20)
    assert os.environ["HOROVOD_CYCLE_TIME"] == "1"
    assert os.environ["HOROVOD_FUSION_THRESHOLD"] == str(4 * 2**20)
    assert os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "60"


def test_no_data_parallelism_keeps_horovod_quiet_and_its_fusion(clean_env):
    configure_horovod_env(30.0, data_parallel=False)
    assert os.environ["HOROVOD_CYCLE_TIME"] == "50"
    assert "HOROVOD_FUSION_THRESHOLD" not in os.environ


def test_user_values_win(clean_env):
    clean_env.setenv("HOROVOD_CYCLE_TIME", "3")
    clean_env.setenv("HOROVOD_FUSION_THRESHOLD", "0")
    configure_horovod_env(30.0, data_parallel=True, fusion_bytes=4 * 2**20)
    assert os.environ["HOROVOD_CYCLE_TIME"] == "3"
    assert os.environ["HOROVOD_FUSION_THRESHOLD"] == "0"


def test_reduce_op_config():
    assert build_config({}, []).train.reduce_op == "average"
    assert build_config({}, ["train.reduce_op=adasum"]).train.reduce_op == "adasum"
    bad = {
        "train.reduce_op=sum": "must be one of average, adasum",
        "train.compression=fp16": "cannot be combined with train.compression",
        "train.zero=1": "cannot be combined with train.zero = 1",
    }
    for extra, message in bad.items():
        sets = ["train.reduce_op=adasum", extra] if extra != "train.reduce_op=sum" else [extra]
        with pytest.raises(ConfigError, match=message):
            build_config({}, sets)
    with pytest.raises(ConfigError, match="power of two, got 3"):
        build_config({}, ["train.reduce_op=adasum", "parallel.dp=3",
                          "train.global_batch_size=6", "train.micro_batch_size=2"])


@pytest.mark.parametrize("sets,framework,want", [
    ([], "torch", False),  # the dense average of host gradients: in-place MPI
    ([], "tensorflow", False),
    (["train.compression=fp16"], "torch", True),
    (["train.compression=powersgd"], "tensorflow", True),
    (["train.zero=1"], "torch", True),
    (["train.reduce_op=adasum"], "torch", True),
])
def test_horovod_carries_gradients_only_off_the_in_place_path(clean_env, sets, framework, want):
    clean_env.delenv("HVDLLM_DP_TRANSPORT", raising=False)
    train = build_config({}, sets).train
    assert horovod_carries_gradients(train, framework) is want


def test_forced_horovod_transport(clean_env):
    clean_env.setenv("HVDLLM_DP_TRANSPORT", "horovod")
    train = build_config({}, []).train
    assert horovod_carries_gradients(train, "torch")
    assert not horovod_carries_gradients(train, "tensorflow")  # TF has no such switch
    from hvdllm.torch.data_parallel import dp_transport
    assert dp_transport() == "horovod"
    clean_env.setenv("HVDLLM_DP_TRANSPORT", "nccl")
    with pytest.raises(ValueError, match="HVDLLM_DP_TRANSPORT='nccl' is not one of auto, horovod"):
        dp_transport()
