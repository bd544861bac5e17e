"""Short training trials that calibrate what the planner's formulas cannot see.

The time model (:func:`hvdllm.common.planner.predict_time`) prices
matmuls, element-wise traffic, link transfers and the engines' measured
call costs.  A real step has more: a framework's graph runs slower or
faster than the sum of its parts, tensor-parallel ranks wait for each
other at every collective, and a pipeline stage drives its chunks through
a different path than a fused step (TensorFlow's tape keeps every
intermediate across the call boundary, which slows the chunk's compute
itself by about 1.3x on a CPU).

So ``hvdllm plan --calibrate`` also trains a small model
(:data:`TRIAL_MODEL`, 4 layers of width 128) for 20 steps under four
2-rank layouts (:data:`TRIALS`), in two rounds (the faster counts) with the real engines, and fits one figure
per engine path against the formulas' prediction for the same model and
layout:

* ``compute_factor`` (the data-parallel trial): measured compute over
  predicted, applied to every layout's compute;
* ``collective_overhead`` and ``sp_collective_overhead`` (the
  tensor-parallel trials): what a step costs beyond the predicted compute
  and transfers, per tensor-parallel collective, without and with sequence
  parallelism;
* ``pipeline_factor`` (the pipeline trial): a pipeline stage's compute over
  the fused step's, for the same work.

The figures are fitted on the trial model, not on the model being planned,
so the planner's check (``benchmarks/plan_check.py``) stays a test of
prediction.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

#: The trial model: small enough to train in seconds, shaped like the
#: models planned (4 layers so that 2 stages hold 2 each).
TRIAL_MODEL = ["model.family=gpt", "model.n_layer=4", "model.d_model=128", "model.n_head=4",
               "model.seq_len=128", "train.global_batch_size=8", "model.dropout=0.0"]
#: name -> the layout's settings, each on 2 ranks.
TRIALS = {
    "dp": ["parallel.dp=2", "train.micro_batch_size=2"],
    "tp": ["parallel.tp=2", "train.micro_batch_size=2"],
    "sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=2"],
    "pp": ["parallel.pp=2", "train.micro_batch_size=2", "parallel.schedule=1f1b"],
}
TRIAL_STEPS = 20
#: steps left out of the median (tracing, first allocations)
WARMUP_STEPS = 4
#: rounds over all trials; each trial keeps its fastest round, so that a slow
#: spell of a shared machine does not land on one layout only
TRIAL_ROUNDS = 2


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_trial(mpirun: str, framework: str, sets: list[str], work: Path,
              timeout: float = 300.0) -> float:
    """Median seconds per step of a short ``hvdllm train`` on 2 ranks."""
    from .errors import EnvironmentSetupError

    out = work / "run"
    if work.exists():
        shutil.rmtree(work)
    cmd = [mpirun, "-np", "2", "--oversubscribe", sys.executable, "-m", "hvdllm", "train",
           "--set", f"train.framework={framework}", "--set", f"train.steps={TRIAL_STEPS}",
           "--set", "train.log_every=1", "--set", "output.checkpoint=false",
           "--set", f"output.dir={out}"]
    for s in TRIAL_MODEL + sets:
        cmd += ["--set", s]
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise EnvironmentSetupError(f"calibration trial {' '.join(sets)} did not finish in "
                                    f"{timeout:.0f} s") from None
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EnvironmentSetupError(f"calibration trial {' '.join(sets)} failed "
                                    f"(exit {proc.returncode}): {tail[0]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][WARMUP_STEPS:]
    if not rates:
        raise EnvironmentSetupError(f"calibration trial {' '.join(sets)} logged no step times")
    cfg = _trial_config(framework, sets)
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    return statistics.median(tokens / r for r in rates)


def _trial_config(framework: str, sets: list[str]) -> Any:
    from .config import load_config

    return load_config(None, TRIAL_MODEL + sets + [f"train.framework={framework}"])


def _trial_layout(cfg: Any) -> Any:
    from .planner import Layout

    p = cfg.parallel
    return Layout(p.dp, p.tp, p.pp, cfg.train.micro_batch_size, p.schedule, p.virtual_stages,
                  0, p.recompute, p.sequence_parallel)


def fit(framework: str, hw: Any, measured: dict[str, float]) -> dict[str, float]:
    """The trial figures (see the module docstring) from measured step seconds per trial."""
    from .planner import predict_time, tp_collective_calls

    base = replace(hw, compute_factor=1.0, pipeline_factor=1.0, collective_overhead=0.0,
                   sp_collective_overhead=0.0)
    pred = {}
    for name, sets in TRIALS.items():
        cfg = _trial_config(framework, sets)
        pred[name] = (cfg, _trial_layout(cfg), predict_time(cfg, _trial_layout(cfg), base))
    out: dict[str, float] = {}
    _, _, dp = pred["dp"]
    rest = dp.dp_comm + dp.optimizer
    out["compute_factor"] = max(0.1, (measured["dp"] - rest) / dp.compute)
    f = out["compute_factor"]
    for name, key in (("tp", "collective_overhead"), ("sp", "sp_collective_overhead")):
        cfg, lay, t = pred[name]
        left = measured[name] - (t.compute * f + t.tp_comm + t.optimizer)
        out[key] = max(0.0, left / tp_collective_calls(cfg, lay))
    cfg, lay, t = pred["pp"]
    n_micro = cfg.train.global_batch_size // (lay.micro_batch_size * lay.dp)
    share = (lay.pp - 1) / (lay.virtual_stages * n_micro)
    # measured = (compute * f * g + pp_comm) * (1 + share) + optimizer, solved for g
    stage = (measured["pp"] - t.optimizer) / (1.0 + share) - t.pp_comm
    out["pipeline_factor"] = max(0.5, stage / (t.compute * f))
    return out


def calibrate_with_trials(framework: str, hw: Any, mpirun: str, rounds: int = TRIAL_ROUNDS,
                          log: Callable[[str], None] = print) -> tuple[Any, dict[str, float]]:
    """``hw`` with the trial figures fitted in, and the measured step seconds per trial."""
    runs: dict[str, list[float]] = {name: [] for name in TRIALS}
    with tempfile.TemporaryDirectory(prefix="hvdllm-trial-") as tmp:
        for _ in range(rounds):
            for name, sets in TRIALS.items():
                runs[name].append(run_trial(mpirun, framework, sets, Path(tmp) / name))
    measured = {name: min(times) for name, times in runs.items()}
    for name, sets in TRIALS.items():
        log(f"trial {name} ({' '.join(sets)}): {measured[name] * 1e3:.1f} ms per step "
            f"(rounds: {', '.join(f'{t * 1e3:.1f}' for t in runs[name])})")
    return replace(hw, **fit(framework, hw, measured)), measured
