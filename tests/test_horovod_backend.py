"""Tier 1/2: which transport Horovod's thread uses, and Gloo's start-up under mpirun."""
import json
import sys

import pytest

from hvdllm.common import horovod_backend as hb
from hvdllm.common.errors import EnvironmentSetupError

from conftest import REPO, base_env, mpirun_prefix, run_ok


def test_slot_plan_matches_horovodrun_numbering():
    plan = hb.slot_plan(["a", "a", "b", "b"])
    assert [(s.hostname, s.rank, s.local_rank, s.local_size) for s in plan] == [
        ("a", 0, 0, 2), ("a", 1, 1, 2), ("b", 2, 0, 2), ("b", 3, 1, 2)]
    assert [(s.cross_rank, s.cross_size, s.size) for s in plan] == [(0, 2, 4), (0, 2, 4),
                                                                    (1, 2, 4), (1, 2, 4)]


def test_slot_plan_uneven_hosts():
    # Host b has one rank: local rank 1 exists on a only, so its cross group is {a}.
    plan = hb.slot_plan(["a", "b", "a"])
    assert [(s.local_rank, s.local_size, s.cross_rank, s.cross_size) for s in plan] == [
        (0, 2, 0, 2), (0, 1, 1, 2), (1, 2, 0, 1)]


@pytest.mark.parametrize("env,expected", [
    ({}, "mpi"),
    ({"HVDLLM_HOROVOD_BACKEND": "gloo"}, "gloo"),
    ({"HVDLLM_HOROVOD_BACKEND": "MPI"}, "mpi"),
    ({"HVDLLM_HOROVOD_BACKEND": "auto", "HOROVOD_CONTROLLER": "gloo"}, "gloo"),
    ({"HVDLLM_HOROVOD_BACKEND": "mpi", "HOROVOD_CONTROLLER": "gloo"}, "mpi"),
    ({"HOROVOD_CONTROLLER": "mpi"}, "mpi"),
])
def test_choose_backend(monkeypatch, env, expected):
    monkeypatch.delenv("HVDLLM_HOROVOD_BACKEND", raising=False)
    monkeypatch.delenv("HOROVOD_CONTROLLER", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert hb.choose_backend() == expected


def test_bad_backend_is_one_line(monkeypatch):
    monkeypatch.setenv("HVDLLM_HOROVOD_BACKEND", "nccl")
    with pytest.raises(EnvironmentSetupError) as info:
        hb.choose_backend()
    assert "\n" not in str(info.value) and "auto, mpi, gloo" in str(info.value)


def test_forced_gloo_under_mpirun_on_one_host():
    """The drop-in's init starts the rendezvous itself; Horovod's allreduce then runs over Gloo."""
    env = base_env()
    env["HVDLLM_HOROVOD_BACKEND"] = "gloo"
    env.pop("HOROVOD_CONTROLLER", None)
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(REPO / "tests/multinode/horovod_view.py"),
                                     "hvdllm"], timeout=120, env=env)
    views = sorted((json.loads(line) for line in res.stdout.splitlines()
                    if line.startswith("{")), key=lambda v: v["rank"])
    assert [v["rank"] for v in views] == [0, 1]
    for view in views:
        assert view["controller"] == "gloo"
        assert view["world_sum"] == 1.0
        assert (view["size"], view["local_size"], view["cross_size"]) == (2, 2, 1)
        assert view["local_rank"] == view["rank"]
