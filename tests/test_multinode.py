"""Multi-node runs on one machine: two simulated hosts (tests/multinode/hosts.py).

Each host is a network namespace with its own address and host name; a veth
pair is the network between them.  ``mpirun`` runs on the first host with a
hostfile naming both, and starts its daemon on the second through an ssh
stand-in (tests/multinode/rsh_agent.py); Open MPI's TCP traffic is held to
the hosts' subnet, so every byte between the hosts crosses the veth link.

* Horovod sees two hosts of two ranks (local and cross ranks), threads per
  rank are sized by the ranks on the host, and an allreduce spans both
  (stock Horovod, and hvdllm's drop-in over MPI and over Gloo);
* ``hvdllm train`` across the hosts (both frameworks at dp=2 x tp=2,
  TensorFlow at dp=2): the loss of each of 20 steps equals the one-process run within 1e-4
  relative, each TP group sits on one host (each DP group on both), and more
  than the data-parallel gradient bytes crossed the link each way;
* a hostfile naming a host with nothing behind it (no address resolution,
  or packets dropped without answer) fails with the launcher's error naming
  the host, within a bound, and does not hang.

Marked ``multinode``: needs root, ``ip`` and ``unshare``, so it is deselected
unless HVDLLM_MULTINODE is set (``make test-multinode``); docs/multinode.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest

from conftest import REPO, base_env, hvdllm_cmd, read_metrics, run, run_ok
from hvdllm.common.topology import Topology
from multinode.hosts import SILENT, UNREACHABLE, SimulatedHosts, missing_requirements

pytestmark = pytest.mark.multinode
STEPS = 20
GLOBAL_BATCH = 8
# The launcher must give up on a dead host within this many seconds.  The
# agent's connect fails when the kernel's address resolution gives up (about
# 3 s) or at its 10 s connect timeout (as ssh's ConnectTimeout); Open MPI then
# reports at once (measured: docs/multinode.md).
UNREACHABLE_BOUND_SEC = 30
FORWARD = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "TF_CPP_MIN_LOG_LEVEL", "HVDLLM_VERBOSE",
           "HVDLLM_HOROVOD_BACKEND")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = missing_requirements()
    if why:
        pytest.fail(why)
    sim = SimulatedHosts(tmp_path_factory.mktemp("multinode")).open()
    try:
        yield sim
    finally:
        sim.close()


def mpirun_on_hosts(sim: SimulatedHosts, names: tuple[str, ...], np_: int, argv: list[str],
                    timeout: float, slots: int = 2, **kw):
    env = base_env()
    mpirun = shutil.which("mpirun", path=env["PATH"])
    assert mpirun, "mpirun not found; run `make setup`"
    cmd = [mpirun, "-np", str(np_), "--hostfile", str(sim.hostfile(names, slots=slots)),
           *sim.mpi_args()]
    env.update(sim.agent_env())
    env["HVDLLM_VERBOSE"] = "1"
    for name in FORWARD:
        if name in env:
            cmd += ["-x", name]
    return run(sim.on_host(0, cmd + argv), timeout, env=env, **kw)


# (which, HVDLLM_HOROVOD_BACKEND): stock horovod.torch (over MPI), and the
# hvdllm drop-in over each of its two transports.
VIEWS = [("horovod", "mpi"), ("hvdllm", "mpi"), ("hvdllm", "gloo")]


@pytest.mark.parametrize("which,backend", VIEWS, ids=[f"{w}-{b}" for w, b in VIEWS])
def test_horovod_sees_two_hosts(hosts, monkeypatch, which, backend):
    monkeypatch.setenv("HVDLLM_HOROVOD_BACKEND", backend)
    res = mpirun_on_hosts(hosts, hosts.names, 4,
                          [sys.executable, str(REPO / "tests" / "multinode" / "horovod_view.py"),
                           which], timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    views = sorted((json.loads(line) for line in res.stdout.splitlines()
                    if line.startswith("{")), key=lambda v: v["rank"])
    assert [v["rank"] for v in views] == [0, 1, 2, 3], res.stdout
    threads = max(1, (os.cpu_count() or 1) // 2)
    for v in views:
        host_index = v["rank"] // 2  # by slot: ranks 0, 1 on nodea; 2, 3 on nodeb
        assert v["host"] == hosts.names[host_index], v
        assert (v["local_size"], v["local_rank"]) == (2, v["rank"] % 2), v
        assert (v["cross_size"], v["cross_rank"]) == (2, host_index), v
        assert v["threads"] == threads, v
        assert v["world_sum"] == 6.0, v
        assert v["controller"] == backend, v


def train_args(framework: str, out, dp: int, tp: int) -> list[str]:
    micro = GLOBAL_BATCH // dp
    return ["train", "--config", str(REPO / "configs" / "demo.toml"),
            "--set", f"train.framework={framework}", "--set", f"parallel.dp={dp}",
            "--set", f"parallel.tp={tp}", "--set", f"train.steps={STEPS}",
            "--set", f"train.global_batch_size={GLOBAL_BATCH}",
            "--set", f"train.micro_batch_size={micro}", "--set", "train.lr=3e-3",
            "--set", "train.log_every=1", "--set", "train.sample_tokens=0",
            "--set", f"output.dir={out}"]


# (framework, dp, tp): both at dp=2 x tp=2 on 4 ranks, two per host, and
# TensorFlow at dp=2, one rank per host.  Horovod over MPI (the default).
LAYOUTS = [("torch", 2, 2), ("tensorflow", 2, 2), ("tensorflow", 2, 1)]


@pytest.mark.parametrize("framework,dp,tp", LAYOUTS, ids=[f"{f}-dp{d}xtp{t}" for f, d, t in LAYOUTS])
def test_train_across_two_hosts(hosts, tmp_path, framework, dp, tp):
    ref_dir, run_dir = tmp_path / "one_process", tmp_path / "two_hosts"
    world = dp * tp
    per_host = world // 2
    run_ok(hvdllm_cmd(*train_args(framework, ref_dir, 1, 1)), timeout=400)
    rx0, tx0 = hosts.link_bytes(0)
    t0 = time.monotonic()
    res = mpirun_on_hosts(hosts, hosts.names, world,
                          hvdllm_cmd(*train_args(framework, run_dir, dp, tp)), timeout=1800,
                          slots=per_host)
    took = time.monotonic() - t0
    rx1, tx1 = hosts.link_bytes(0)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    print(f"{framework} dp={dp} x tp={tp} over two hosts: {took:.0f}s; "
          f"link rx {rx1 - rx0:,} tx {tx1 - tx0:,} B")

    # (a) the loss curve of one process
    ref = read_metrics(ref_dir)
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    ref_loss = np.array([r["loss"] for r in ref])
    got_loss = np.array([r["loss"] for r in got])
    assert ref_loss[-1] < ref_loss[0] - 0.5, ref_loss  # training moved
    rel = np.abs(got_loss - ref_loss) / np.abs(ref_loss)
    print(f"loss {ref_loss[0]:.4f} -> {ref_loss[-1]:.4f}; max relative difference {rel.max():.2e}")
    assert rel.max() < 1e-4, f"max relative diff {rel.max():.2e} at step {rel.argmax() + 1}"

    # (b) each TP group on one host; each DP group across both
    found = re.findall(r"hvdllm: rank (\d+): .* on host (\S+) \((\d+) rank\(s\) on this host"
                       r".*Horovod over (\w+)\)", res.stdout)
    host_of = {int(rank): host for rank, host, _, _ in found}
    assert sorted(host_of) == list(range(world)), res.stdout[-3000:]
    assert {int(n) for _, _, n, _ in found} == {per_host}, found
    assert {backend for *_, backend in found} == {"mpi"}, found
    topo = Topology(dp=dp, tp=tp)
    for group in topo.all_groups("tp"):
        assert len({host_of[r] for r in group}) == 1, (group, host_of)
    for group in topo.all_groups("dp"):
        assert {host_of[r] for r in group} == set(hosts.names), (group, host_of)

    # (c) the traffic crossed the link: every DP group (one per TP rank)
    # reduces over it every step, each rank sending its shard's gradients
    # (comm_bytes is rank 0's).
    grad_bytes = tp * sum(r["comm_bytes"] for r in got)
    assert grad_bytes > 0
    assert rx1 - rx0 > grad_bytes, (rx1 - rx0, grad_bytes)
    assert tx1 - tx0 > grad_bytes, (tx1 - tx0, grad_bytes)


@pytest.mark.parametrize("dead_host,reason", [(UNREACHABLE, "No route to host"),
                                               (SILENT, "Connection timed out")])
def test_unreachable_host_fails_fast(hosts, dead_host, reason):
    t0 = time.monotonic()
    res = mpirun_on_hosts(hosts, (hosts.names[0], dead_host), 4, ["hostname"],
                          timeout=UNREACHABLE_BOUND_SEC + 60)
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    print(f"{dead_host}: exit {res.returncode} after {took:.1f}s\n{out[-2000:]}")
    assert res.returncode != 0, out
    assert took < UNREACHABLE_BOUND_SEC, f"took {took:.1f}s"
    assert re.search(rf"Remote host:\s+{dead_host}\b", out), out  # Open MPI names the host
    # and the agent's (ssh's) own reason reaches the user
    assert f"connect to host {dead_host} port 22: {reason}" in out, out
