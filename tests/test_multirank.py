"""Tier 2: multi-rank tests under mpirun and horovodrun, each with a deadline."""
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import base_env, horovodrun_prefix, mpirun_prefix, run, run_ok

pytestmark = pytest.mark.multirank
SCRIPTS = Path(__file__).parent / "mpi_scripts"


@pytest.mark.parametrize("np_,layout", [(2, (2, 1, 1)), (4, (4, 1, 1)), (4, (2, 2, 1)),
                                        (4, (1, 2, 2)), (4, (2, 1, 2))])
def test_group_collectives_and_p2p(np_, layout):
    res = run_ok(mpirun_prefix(np_) + [sys.executable, str(SCRIPTS / "comm_check.py"),
                                       *map(str, layout)], timeout=120)
    assert res.stdout.count("comm checks passed") == np_


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("layout", [(4, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_horovod_process_sets_match_groups(framework, layout):
    res = run_ok(mpirun_prefix(4) + [sys.executable, str(SCRIPTS / "horovod_groups_check.py"),
                                     framework, *map(str, layout)], timeout=180)
    assert res.stdout.count("horovod process sets ok") == 4


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_one_failing_rank_ends_the_job(launcher, framework):
    prefix = mpirun_prefix(2) if launcher == "mpirun" else horovodrun_prefix(2)
    res = run(prefix + [sys.executable, str(SCRIPTS / "fail_one_rank.py"), framework], timeout=120)
    ended = time.time()
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "ValueError: deliberate failure on the last rank" in out
    assert "deliberately_broken_step" in out  # the traceback, not just the message
    assert "rank 1 of 2 failed" in out
    # The failing rank's report comes before any Horovod shutdown noise.
    shutdown = out.find("has been shut down")
    assert shutdown == -1 or shutdown > out.find("deliberate failure")
    # The job ends within 30 s of the exception (the other rank would wait 600 s).
    raised = float(re.search(r"raising at ([0-9.]+)", out).group(1))
    assert ended - raised < 30, ended - raised


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_stalled_peer_becomes_an_error(framework):
    res = run(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "stalled_peer.py"), framework, "5"],
              timeout=120)
    ended = time.time()
    assert res.returncode != 0
    out = res.stdout + res.stderr
    # Horovod's stall report names the missing rank and the operation (TF's
    # eager ops carry their op name rather than the tensor name).
    op = "allreduce.stalled.tensor" if framework == "torch" else "HorovodAllreduce"
    assert "Missing ranks" in out and f"1!: [{op}]" in out, out[-3000:]
    assert "rank 0 of 2 failed" in out
    waited = float(re.search(r"waiting at ([0-9.]+)", out).group(1))
    assert ended - waited < 30, ended - waited


@pytest.mark.parametrize("transport", ["mpi", "horovod"])
def test_torch_allreduce_overlaps_backward_and_skips_accumulation(transport):
    env = base_env()
    if transport == "horovod":
        env["HVDLLM_DP_TRANSPORT"] = "horovod"
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "torch_dp_check.py"), transport],
                 timeout=120, env=env)
    assert res.stdout.count("torch dp checks passed") == 2


@pytest.mark.parametrize("op,transport", [("average", "mpi"), ("average", "horovod"),
                                          ("adasum", "horovod")])
def test_torch_dp_gradients_are_the_reduction_of_local_gradients(op, transport):
    env = base_env()
    if transport == "horovod" and op == "average":
        env["HVDLLM_DP_TRANSPORT"] = "horovod"
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "torch_dp_grads.py"), op,
                                     transport], timeout=120, env=env)
    assert res.stdout.count(f"torch dp grads {op} passed") == 2, res.stdout[-2000:]


def test_tensorflow_single_allreduce_outside_accumulation_loop():
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "tf_dp_check.py")], timeout=180)
    assert res.stdout.count("tensorflow dp checks passed") == 2
