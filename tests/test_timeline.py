"""Step profiles (``train.profile_steps``) and ``hvdllm timeline``: the merge's
arithmetic on made-up events, then real multi-rank runs in both frameworks,
whose merged clocks must respect causality across ranks."""
from __future__ import annotations

import json

import pytest

from hvdllm.cli import main
from hvdllm.common import timeline as T

from conftest import base_env, hvdllm_cmd, mpirun_prefix, run_ok


def _profile(rank, events, pp=1, coords=(0, 0, 0), offset=0.0, **meta):
    return dict({"rank": rank, "world": 2, "coords": list(coords), "dp": 1, "tp": 1, "pp": pp,
                 "schedule": "1f1b", "virtual_stages": 1, "micro_batches": 2, "host": "h",
                 "clock_offset": offset, "wall_minus_monotonic": 0.0, "steps": [1, 1],
                 "events": events}, **meta)


def test_summary_splits_compute_waits_and_idle():
    events = [["step", "step", 0.0, 10.0, {}],
              ["forward", "compute", 0.0, 4.0, {"mb": 0}],
              ["recv", "wait:pp", 1.0, 3.0, {}],       # nested in the forward
              ["backward", "compute", 5.0, 8.0, {"mb": 0}],
              ["allreduce", "wait:dp", 7.0, 9.0, {}]]  # overlaps the backward's end
    s = T.summarize(_profile(0, events, pp=2))
    assert s.step_time == pytest.approx(10.0)
    assert s.exposed_comm == pytest.approx(4.0)          # [1,3] + [7,9]
    assert s.compute == pytest.approx(2.0 + 2.0)         # [0,4]-[1,3] and [5,8]-[7,9]
    assert s.idle == pytest.approx(2.0)                  # [4,5] and [9,10]
    assert s.bubble == pytest.approx((2.0 + 2.0) / 10)   # pipeline waits + idle
    assert s.simulated_bubble == pytest.approx(1 / 3)    # 1F1B, p=2, m=2


def test_merge_aligns_clocks_and_rejects_missing_ranks(tmp_path, capsys):
    prof = tmp_path / "profile"
    prof.mkdir()
    (prof / "rank-0.json").write_text(json.dumps(_profile(0, [["step", "step", 100.0, 101.0, {}]])))
    # rank 1's clock runs 50 s behind rank 0's: its offset brings it back
    (prof / "rank-1.json").write_text(json.dumps(
        _profile(1, [["step", "step", 50.5, 51.0, {}]], coords=(1, 0, 0), offset=50.0)))
    assert main(["timeline", str(tmp_path)]) == 0
    assert "rank" in capsys.readouterr().out
    trace = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    steps = {e["pid"]: e for e in trace if e.get("cat") == "step"}
    assert steps[0]["ts"] == pytest.approx(0.0)
    assert steps[1]["ts"] == pytest.approx(0.5e6)
    (prof / "rank-1.json").unlink()
    assert main(["timeline", str(tmp_path)]) == 2
    assert "lacks the profiles of rank(s) [1]" in capsys.readouterr().err
    assert main(["timeline", str(tmp_path / "nothing")]) == 2
    assert "train.profile_steps" in capsys.readouterr().err


def _run(tmp_path, framework, np, sets, env_extra=None):
    out = tmp_path / framework
    env = base_env()
    env.update(env_extra or {})
    cmd = mpirun_prefix(np)
    for key in env_extra or {}:
        cmd += ["-x", key]
    cmd += hvdllm_cmd("train", "--set", "model.n_layer=2", "--set", "model.d_model=64",
                      "--set", "model.seq_len=32", "--set", "train.steps=4",
                      "--set", "train.profile_steps=[2,3]", "--set", f"train.framework={framework}",
                      "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=2",
                      "--set", f"output.dir={out}", "--set", "output.checkpoint=false", *sets)
    run_ok(cmd, timeout=240, env=env)
    res = run_ok(hvdllm_cmd("timeline", str(out)), timeout=60)
    trace = json.loads((out / "timeline.json").read_text())["traceEvents"]
    return out, res.stdout, trace


def _events(trace, pid, prefix):
    return [e for e in trace if e["ph"] == "X" and e["pid"] == pid and e["name"].startswith(prefix)]


def _check_pipeline(trace, summary, micro):
    for rank in (0, 1):
        assert len(_events(trace, rank, "step")) == 2
        assert len(_events(trace, rank, "forward")) == 2 * micro
        assert len(_events(trace, rank, "backward")) == 2 * micro
        assert _events(trace, rank, "optimizer")
    assert [e for e in trace if e["ph"] == "X" and e.get("cat") == "wait:pp"]
    posts = [e["name"] for e in trace if e["ph"] == "i" and e["pid"] == 0]
    assert sum("send of activation" in n for n in posts) == 2 * micro  # every send, marked
    assert sum("recv of gradient" in n for n in posts) == 2 * micro
    # Causality across ranks, through the aligned clocks: stage 1 cannot start a
    # micro-batch's forward before stage 0 has finished it, and stage 0 cannot
    # start its backward before stage 1 has finished it.
    for mb in range(micro):
        f0 = _events(trace, 0, f"forward mb{mb} ")[0]
        f1 = _events(trace, 1, f"forward mb{mb} ")[0]
        assert f1["ts"] + f1["dur"] >= f0["ts"] + f0["dur"] - 2e3, (f0, f1)
        b0 = _events(trace, 0, f"backward mb{mb} ")[0]
        b1 = _events(trace, 1, f"backward mb{mb} ")[0]
        assert b0["ts"] + b0["dur"] >= b1["ts"] - 2e3, (b0, b1)
    lines = summary.splitlines()
    assert lines[0].startswith("wrote ") and len(lines) == 4
    assert lines[2].split()[-1].endswith("%")   # the simulator's bubble, next to the measured


def test_torch_pipeline_timeline(tmp_path):
    out, summary, trace = _run(tmp_path, "torch", 2, ["--set", "parallel.pp=2"])
    _check_pipeline(trace, summary, micro=4)
    assert sorted(p.name for p in (out / "profile").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_tensorflow_pipeline_timeline(tmp_path):
    _, summary, trace = _run(tmp_path, "tensorflow", 2, ["--set", "parallel.pp=2"])
    _check_pipeline(trace, summary, micro=4)


def test_horovod_timeline_is_merged(tmp_path):
    """Data parallelism through Horovod: its allreduces land inside the profiled steps."""
    _, summary, trace = _run(tmp_path, "torch", 2,
                             ["--set", "parallel.dp=2", "--set", "train.horovod_timeline=true"],
                             env_extra={"HVDLLM_DP_TRANSPORT": "horovod"})
    hvd = [e for e in trace if e["pid"] == 2 and e["ph"] in ("B", "X") and "ALLREDUCE" in e["name"]]
    assert hvd, "no Horovod allreduce in the merged trace"
    steps = _events(trace, 0, "step")
    first, last = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
    inside = [e for e in hvd if first <= e["ts"] <= last]
    assert len(inside) >= 2  # the step's gradient allreduce, in each profiled step
    assert len(summary.splitlines()) == 4
