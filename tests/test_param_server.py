"""Parameter-server mode (``parallel.mode = "ps"``): SSP with bounded staleness.

* ``staleness = 0`` trains exactly like synchronous data parallelism: the
  same loss at each of 20 steps within 1e-5 relative (fp32, AdamW and SGD
  with torch workers, AdamW with TensorFlow's);
* with one replica slowed (``parallel.straggler``), every update's observed
  staleness stays within ``s`` and reaches it;
* a frozen server or worker ends the job within the deadline, with an error
  that names the rank;
* a run resumed from the servers' checkpoint continues bit for bit;
* a pull answers the parameters the servers' updates, replayed, give (and
  their extrapolation with ``ps_compensation = "extrapolate"``);
* bad layouts fail with one line.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, base_env, hvdllm_cmd, mpirun_prefix, read_metrics, run, run_ok

pytestmark = pytest.mark.multirank
STEPS = 20
MODEL = ["model.family=gpt", "model.n_head=4", "model.d_model=32", "model.seq_len=16",
         "model.vocab_size=259", "model.n_layer=2", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.lr=3e-3", "output.checkpoint=false"]
FAULT = str(Path(__file__).parent / "mpi_scripts" / "ps_with_fault.py")
PROTOCOL = str(Path(__file__).parent / "mpi_scripts" / "ps_protocol_check.py")


def _args(sets):
    return [a for item in sets for a in ("--set", item)]


def _train(tmp_path, name, ranks, sets, steps=STEPS):
    out = tmp_path / name
    cmd = hvdllm_cmd("train", *_args(MODEL + [f"train.steps={steps}", f"output.dir={out}"]
                                      + list(sets)))
    run_ok(mpirun_prefix(ranks) + cmd, timeout=600)
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    return records


@pytest.mark.parametrize("framework,optimizer", [("torch", "adamw"), ("torch", "sgd"),
                                                  ("tensorflow", "adamw")])
def test_staleness_zero_is_synchronous(tmp_path, framework, optimizer):
    opt = [f"train.optimizer={optimizer}", "train.weight_decay=0.1",
           f"train.framework={framework}"]
    sync = _train(tmp_path, "sync", 2, ["parallel.dp=2"] + opt)
    ps = _train(tmp_path, "ps", 3, ["parallel.dp=2", "parallel.mode=ps"] + opt)
    a = np.array([r["loss"] for r in sync])
    b = np.array([r["loss"] for r in ps])
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert a[-1] < a[0] - 0.1  # it trains
    assert all(r["staleness"] == [0, 0] for r in ps)


def test_staleness_is_bounded_and_reached_under_a_straggler(tmp_path):
    """Replica 1 runs 3x slower; replica 0 runs ahead by at most s = 2 clocks."""
    ps = _train(tmp_path, "ps", 3, ["parallel.dp=2", "parallel.mode=ps", "parallel.staleness=2",
                                    "parallel.straggler=1:3"])
    seen = [s for r in ps for s in r["staleness"]]
    assert max(seen) == 2 and min(seen) >= 0, seen
    # the fast replica is the stale one; the straggler always sees fresh parameters
    assert max(r["staleness"][0] for r in ps) == 2
    assert all(r["staleness_max"] == max(r["staleness"]) for r in ps)
    losses = [r["loss"] for r in ps]
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("mode", ["none", "extrapolate"])
def test_pull_answers_the_replayed_parameters(mode):
    """One worker, two servers: a pull for clock 4 at version 2 gets version 2, or
    with ``parallel.ps_compensation = "extrapolate"`` version 2 plus twice the
    last update; an up-to-date pull gets the parameters as they are."""
    res = run_ok(mpirun_prefix(3) + [sys.executable, PROTOCOL, mode], timeout=120)
    assert "ok" in res.stdout.split()


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("inside,servers", [("parallel.tp=2", 2), ("parallel.pp=2", 1)])
def test_tensor_and_pipeline_parallel_replicas(tmp_path, framework, inside, servers):
    """Replicas of tp=2 (on 2 servers) or pp=2: the same losses as synchronous dp=2 x that."""
    both = ["parallel.dp=2", inside, f"train.framework={framework}"]
    sync = _train(tmp_path, "sync", 4, both, steps=8)
    ps = _train(tmp_path, "ps", 4 + servers, both + ["parallel.mode=ps",
                                                     f"parallel.ps_servers={servers}"], steps=8)
    np.testing.assert_allclose([r["loss"] for r in ps], [r["loss"] for r in sync], rtol=1e-5)


FREEZE_TIMEOUT = 10  # parallel.timeout_sec of the frozen-rank runs (set-up must fit in it)


def _freeze(tmp_path, role, rank, world, layout):
    """Run 30 steps with ``rank`` frozen at clock 4; the job must fail within
    2 x ``FREEZE_TIMEOUT`` + 20 s of the fault; returns its output."""
    cmd = [sys.executable, FAULT, role, str(rank), "4", "--", "train",
           *_args(MODEL + layout + ["parallel.mode=ps", f"parallel.timeout_sec={FREEZE_TIMEOUT}",
                                    "train.steps=30", f"output.dir={tmp_path}"])]
    res = run(mpirun_prefix(world) + cmd, timeout=120)
    ended = time.time()
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    fault = float(re.search(r"fault on rank \d+ at ([0-9.]+)", out).group(1))
    # a worker names a silent server after twice the timeout; then the abort
    assert ended - fault < 2 * FREEZE_TIMEOUT + 20, (ended - fault, out[-3000:])
    return out


@pytest.mark.parametrize("role,rank,who", [
    ("server", 2, r"parameter server rank\(s\) 2 stopped answering"),
    ("worker", 1, r"worker rank\(s\) 1 \(last pushed clock 3\)")])
def test_a_frozen_rank_is_named(tmp_path, role, rank, who):
    out = _freeze(tmp_path, role, rank, 3, ["parallel.dp=2"])
    assert re.search(who, out), out[-3000:]


@pytest.mark.slow
def test_a_frozen_rank_inside_a_tensor_parallel_replica_is_named(tmp_path):
    """Rank 1 (tp rank 1 of replica 0) freezes.  Two deadlines race, both of
    ``timeout_sec``: the server names rank 1 as the rank that stopped
    pushing, and its tp peer's collective names the tp group [0, 1].
    Whichever fires first ends the job, so either message may be the one."""
    out = _freeze(tmp_path, "worker", 1, 5, ["parallel.dp=2", "parallel.tp=2"])
    by_server = re.search(r"worker rank\(s\) 1 \(last pushed clock 3\)", out)
    by_peer = "on tp group [0, 1]" in out
    assert by_server or by_peer, out[-3000:]


@pytest.mark.parametrize("ranks,sets,needle", [
    (2, ["parallel.ps_servers=2"], "parallel.ps_servers = 2 leaves no worker: the world has 2"),
    (3, ["parallel.dp=2", "parallel.tp=2"],
     "plus dp=2 x tp=2 x pp=1 = 4 worker ranks is 5, but the job has world size 3"),
])
def test_bad_layouts_fail_in_one_line(tmp_path, ranks, sets, needle):
    cmd = hvdllm_cmd("train", *_args(MODEL + ["parallel.mode=ps", "train.steps=2",
                                              f"output.dir={tmp_path}"] + sets))
    res = run(mpirun_prefix(ranks) + cmd, timeout=240)
    assert res.returncode != 0
    lines = [line for line in (res.stdout + res.stderr).splitlines() if needle in line]
    assert lines, (res.stdout + res.stderr)[-3000:]


def test_resume_from_the_servers_checkpoint_is_bitwise(tmp_path):
    """20 steps straight, against 10 steps (saved at 5 and 10) resumed to 20 in the
    same directory: the same losses, bit for bit (s = 0)."""
    ps = ["parallel.dp=2", "parallel.mode=ps", "output.checkpoint=true",
          "output.checkpoint_every=5"]
    whole = _train(tmp_path, "whole", 3, ps)
    _train(tmp_path, "parts", 3, ps, steps=10)
    assert (tmp_path / "parts" / "ps_checkpoints" / "step-00000010" / "server-0.npz").is_file()
    parts = _train(tmp_path, "parts", 3, ps)
    assert [r["loss"] for r in parts] == [r["loss"] for r in whole]


@pytest.mark.parametrize("framework", ["torch", pytest.param("tensorflow",
                                                             marks=pytest.mark.slow)])
def test_the_final_state_resumes_a_synchronous_run(tmp_path, framework):
    """A ps run (s = 0) of 10 steps ends with a training checkpoint of the servers'
    parameters, optimizer state and data position; a sync dp=2 run resumed
    from it gives steps 11-20 of a sync run of 20 steps."""
    both = ["parallel.dp=2", f"train.framework={framework}", "train.weight_decay=0.1"]
    whole = _train(tmp_path, "whole", 2, both)
    _train(tmp_path, "ps", 3, both + ["parallel.mode=ps", "output.checkpoint=true"], steps=10)
    saved = sorted((tmp_path / "ps" / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000010"], saved
    out = tmp_path / "resumed"
    cmd = hvdllm_cmd("train", *_args(MODEL + both + [
        f"train.steps={STEPS}", f"output.dir={out}", f"train.resume={saved[0]}"]))
    run_ok(mpirun_prefix(2) + cmd, timeout=600)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(11, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in resumed],
                               [r["loss"] for r in whole[10:]], rtol=1e-5)


def _pid_of_rank(marker: str, rank: int) -> int | None:
    """The training process of world rank ``rank`` whose command line holds ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (any(marker.encode() in a for a in argv) and b"hvdllm" in argv
                and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env):
            return int(entry.name)
    return None


@pytest.mark.parametrize("role,rank,servers", [
    ("worker", 1, 1), ("second server", 3, 2),
    pytest.param("first server", 2, 1, marks=pytest.mark.slow)])
def test_a_signal_stops_saves_and_the_rerun_continues_bitwise(tmp_path, role, rank, servers):
    """SIGTERM to one rank (a worker or the server) of a long ps run: every rank
    stops after the same step with exit status 75, the servers' shards and a
    training checkpoint hold that step, and rerunning the command continues
    from it with the losses of a run never stopped (s = 0).  A second server
    passes the signal to the first, which picks the step and tells it."""
    out = tmp_path / "stopped"
    ps = ["parallel.dp=2", "parallel.mode=ps", f"parallel.ps_servers={servers}"]
    sets = MODEL + ps + ["output.checkpoint=false", f"output.dir={out}"]
    world = 2 + servers
    cmd = mpirun_prefix(world) + hvdllm_cmd("train", *_args(sets + ["train.steps=100000"]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=base_env(), cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(out) if (out / "metrics.jsonl").exists() else []) < 5:
            assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
            time.sleep(0.05)
        pid = _pid_of_rank(str(out), rank)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, (proc.returncode, stdout[-2000:], stderr[-3000:])
    assert "rerun the same command to continue" in stderr, stderr[-2000:]
    records = read_metrics(out)
    step = records[-1]["step"]
    assert [r["step"] for r in records] == list(range(1, step + 1))
    for k in range(servers):
        assert (out / "ps_checkpoints" / f"step-{step:08d}" / f"server-{k}.npz").is_file()
    assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    # the rerun (3 steps more) continues from there, as if never stopped
    res = run_ok(mpirun_prefix(world) + hvdllm_cmd("train", *_args(
        sets + [f"train.steps={step + 3}"])), timeout=600)
    assert f"resuming after step {step}" in res.stdout
    whole = _train(tmp_path, "whole", world, ps, steps=step + 3)
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in whole]


def test_newest_complete_checkpoint_needs_every_server(tmp_path):
    from hvdllm.common import param_server as ps

    state = {0: {"params": np.arange(3, dtype=np.float32), "step": np.array(4)}}
    for index in (0, 1):
        ps.save_shards(tmp_path, 4, index, 2, state)
    ps.save_shards(tmp_path, 8, 0, 2, state)  # server 1 never wrote step 8
    assert ps.newest_complete(tmp_path, 2, 100) == 4
    assert ps.newest_complete(tmp_path, 2, 3) == 0
    loaded = ps.load_shards(tmp_path, 4, 1)
    np.testing.assert_array_equal(loaded[0]["params"], state[0]["params"])
    assert int(loaded[0]["step"]) == 4


def test_the_writer_keeps_the_newest_complete_checkpoints(tmp_path):
    """The first server's writer prunes all but the newest ``keep`` complete
    checkpoints; an incomplete newer one stays (a server may still be writing
    it) and does not count; a failed write raises at the next call."""
    from hvdllm.common import param_server as ps

    state = {0: {"params": np.arange(3, dtype=np.float32), "step": np.array(1)}}
    ps.save_shards(tmp_path, 2, 1, 2, state)
    ps.save_shards(tmp_path, 4, 1, 2, state)
    writer = ps.ShardWriter(tmp_path, 0, 2, keep=1)
    for step in (2, 4, 6):
        writer.submit(step, state)  # server 1 never writes step 6
    writer.close()
    left = sorted(p.name for p in (tmp_path / ps.PS_CHECKPOINTS).iterdir())
    assert left == ["step-00000004", "step-00000006"]
    assert ps.newest_complete(tmp_path, 2, 100) == 4

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the checkpoint folder would go")
    bad = ps.ShardWriter(blocked, 0, 1, keep=1)
    bad.submit(2, state)
    with pytest.raises(ps.ParameterServerError, match="writing its checkpoint failed"):
        bad.close()
