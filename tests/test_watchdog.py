"""Tier 1: the flight record and culprit logic; the watchdog thread in one process.

The multi-rank behaviour (frozen, busy and slow ranks in every layout) is
in test_hangs.py; here the pieces are checked on their own: who is named
as culprit from which heartbeats, what the report and the record say, and
that a registered wait that cannot be polled (a sleep, or a C call that
holds the GIL) still ends the process in bounded time.
"""
import json
import sys
import textwrap
import time

import pytest

from conftest import base_env, run
from hvdllm.common import watchdog
from hvdllm.common.config import build_config
from hvdllm.common.errors import ConfigError
from hvdllm.common.flight_record import (FlightRecorder, HangReport, PeerState, find_culprit,
                                         not_arrived)

NOW = 1000.0
STALE = 5.0


def event(op="dp gradient allreduce (bucket 0)", group="dp", ranks=(0, 1), peers=None, step=7,
          micro=1, start=NOW - 10.0):
    return FlightRecorder().begin(op, group, tuple(ranks), peers, 1024, step, micro, start)


def beat(rank, age=0.5, waiting=None, idle=0.0, step=7):
    return PeerState(rank=rank, heard_at=NOW - age, step=step, micro=None, waiting=waiting,
                     idle_sec=idle)


def test_flight_recorder_keeps_the_last_n_events_in_order():
    rec = FlightRecorder(capacity=3)
    events = [rec.begin(f"op{i}", "dp", (0, 1), None, i, 1, None, float(i)) for i in range(5)]
    assert [e.op for e in rec.events()] == ["op2", "op3", "op4"]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    events[4].end = 4.5
    doc = events[4].as_dict(wall_offset=100.0)
    assert doc["start"] == 104.0 and doc["end"] == 104.5 and doc["bytes"] == 4


def test_frozen_peer_is_the_culprit_over_a_waiting_one():
    e = event(ranks=(0, 1, 2))
    peers = {1: beat(1, waiting=("dp gradient allreduce (bucket 0)", "dp", (0, 1, 2), 9.0)),
             2: beat(2, age=9.5)}
    culprit = find_culprit(e, 0, peers, [], NOW, STALE)
    assert culprit.rank == 2 and "no heartbeat for 9.5s" in culprit.reason
    # Rank 1 is waiting in the same operation: it arrived; rank 2 did not.
    assert not_arrived(e, 0, peers) == [2]


def test_busy_peer_is_the_culprit_when_nobody_is_frozen():
    e = event()
    peers = {1: beat(1, idle=9.0)}
    culprit = find_culprit(e, 0, peers, [], NOW, STALE)
    assert culprit.rank == 1 and "stuck in its own code" in culprit.reason
    assert not_arrived(e, 0, peers) == [1]


def test_a_silent_group_member_outranks_one_outside_the_group():
    e = event(ranks=(0, 1))
    peers = {1: beat(1, age=8.0), 3: beat(3, age=9.0)}
    assert find_culprit(e, 0, peers, [], NOW, STALE).rank == 1
    # A peer that never sent a heartbeat at all comes first.
    assert find_culprit(e, 0, peers, [2], NOW, STALE).rank == 2


def test_culprit_unknown_when_everyone_waits():
    e = event()
    peers = {1: beat(1, waiting=("pipeline recv", "pp", (1, 3), 9.0))}
    culprit = find_culprit(e, 0, peers, [], NOW, STALE)
    assert culprit.rank is None and "waiting too" in culprit.reason
    assert not_arrived(e, 0, peers) == [1]  # waiting, but elsewhere
    assert not_arrived(e, 0, {}) is None  # no heartbeats: unknowable


def test_point_to_point_waits_name_their_peer():
    e = event(op="pipeline recv of activation", group="pp", ranks=(0, 1, 2, 3), peers=(2,))
    peers = {r: beat(r, waiting=("x", "pp", (0, 1, 2, 3), 1.0)) for r in (1, 3)}
    peers[2] = beat(2, age=9.0)
    assert not_arrived(e, 0, peers) == [2]
    assert find_culprit(e, 0, peers, [], NOW, STALE).rank == 2


def test_report_first_line_names_the_culprit_and_record_has_everything():
    e = event()
    peers = {1: beat(1, age=9.0)}
    report = HangReport(rank=0, world_size=2, event=e, waited_sec=10.0,
                        culprit=find_culprit(e, 0, peers, [], NOW, STALE),
                        not_arrived=not_arrived(e, 0, peers), peers=peers)
    lines = report.lines(NOW, "out/hang-rank-0.json")
    assert lines[0].startswith("[hvdllm] HANG: likeliest culprit rank 1 (no heartbeat")
    text = "\n".join(lines)
    assert "dp gradient allreduce (bucket 0) on dp group [0,1] at step 7, micro-batch 1" in text
    assert "ranks that did not arrive: [1]" in text and "out/hang-rank-0.json" in text
    doc = report.record(NOW, 0.0, [e], "stacks here", "no progress")
    assert doc["culprit"]["rank"] == 1 and list(doc)[0] == "culprit"
    assert doc["waited_in"]["op"] == e.op and doc["waited_in"]["waited_sec"] == 10.0
    assert doc["peers"]["1"]["last_heartbeat_sec_ago"] == 9.0
    assert doc["events"][0]["end"] is None and doc["stacks"] == "stacks here"
    json.dumps(doc)


def test_no_watchdog_means_no_ops():
    null = watchdog.current()
    assert not null.running
    with null.waiting("anything", "dp", (0, 1)) as wait:
        assert wait.event is None
    null.set_step(3)
    null.expired(None, "x")  # returns: the caller raises its own timeout


def test_timeout_from_env(monkeypatch):
    monkeypatch.delenv(watchdog.ENV_TIMEOUT, raising=False)
    assert watchdog.timeout_from_env(300.0) == 300.0
    monkeypatch.setenv(watchdog.ENV_TIMEOUT, "12.5")
    assert watchdog.timeout_from_env(300.0) == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(watchdog.ENV_TIMEOUT, bad)
        with pytest.raises(ConfigError, match="HVDLLM_TIMEOUT_SEC must be a positive"):
            watchdog.timeout_from_env(300.0)


def test_config_keys():
    cfg = build_config({}, ["parallel.watchdog=false", "parallel.flight_record=16"])
    assert cfg.parallel.watchdog is False and cfg.parallel.flight_record == 16
    with pytest.raises(ConfigError, match="parallel.flight_record"):
        build_config({}, ["parallel.flight_record=0"])


SCRIPT = """
import ctypes, sys, time
from mpi4py import MPI
from hvdllm.common.watchdog import Watchdog
dog = Watchdog(MPI.COMM_WORLD, {timeout}, output_dir={out!r}).start()
dog.set_step(5)
with dog.waiting("allreduce that never ends", "dp", (0,)):
    print(f"waiting at {{time.time():.3f}}", flush=True)
    {blocking}
print("the wait returned", flush=True)
"""


def run_blocked_script(tmp_path, blocking, timeout):
    """Run SCRIPT with ``blocking`` inside a registered wait; check it ended in bounds.

    Returns stdout and stderr together.
    """
    code = textwrap.dedent(SCRIPT).format(timeout=timeout, out=str(tmp_path), blocking=blocking)
    res = run([sys.executable, "-c", code], timeout=90, env=base_env())
    ended = time.time()
    out = res.stdout + res.stderr
    waited = float(out.split("waiting at ")[1].split()[0])
    assert res.returncode != 0 and "the wait returned" not in out
    assert ended - waited < timeout + 15, ended - waited
    return out


def test_watchdog_ends_a_wait_that_cannot_be_polled(tmp_path):
    out = run_blocked_script(tmp_path, "time.sleep(600)", timeout=2)
    assert "[hvdllm] HANG: culprit unknown" in out
    assert "rank 0 waited" in out and "allreduce that never ends on dp group [0] at step 5" in out
    assert "most recent call first" in out
    record = json.loads((tmp_path / "hang-rank-0.json").read_text())
    assert record["waited_in"]["op"] == "allreduce that never ends"
    assert "<string>" in record["stacks"]  # the main thread's stack, inside the script


def test_backstop_when_the_gil_is_never_released(tmp_path):
    # libc sleep() through ctypes.PyDLL holds the GIL: the watchdog thread
    # cannot run, so faulthandler's C-level timer must end the process.
    out = run_blocked_script(tmp_path, "ctypes.PyDLL(None).sleep(600)", timeout=2)
    assert "Timeout (0:00:12)!" in out and "most recent call first" in out


class _FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


def test_heartbeat_peers():
    assert watchdog.Watchdog(_FakeComm(1, 4), 10).peers == [0, 2, 3]
    # Beyond 64 ranks: the ranks it shares a group with, else its ring neighbours.
    assert watchdog.Watchdog(_FakeComm(5, 100), 10, neighbours=[5, 7, 55]).peers == [7, 55]
    assert watchdog.Watchdog(_FakeComm(0, 100), 10).peers == [1, 99]
    dog = watchdog.Watchdog(_FakeComm(0, 2), 10)
    assert dog.beat_sec == 1.0 and dog.stale_sec == 5.0
    assert watchdog.Watchdog(_FakeComm(0, 2), 4).beat_sec == 0.4
