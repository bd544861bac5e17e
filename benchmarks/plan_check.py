"""Check ``hvdllm plan`` against measurement: memory per rank and step-time ranking.

    python benchmarks/plan_check.py [--frameworks torch,tensorflow] [--steps 10]
                                    [--repeats 3] [--layouts N | --only I,J,...] [--json OUT]
    python benchmarks/plan_check.py --replay OUT    # the same measurements, predicted again

For each framework: calibrate this machine (``hvdllm plan --calibrate``),
then train the same model under each of the chosen layouts on 2 ranks and
measure

* the step time: the median over the steps after the first two
  (``metrics.jsonl``; 10 steps by default), in ``--repeats`` rounds over
  all layouts (3 by default), keeping each layout's fastest round;
* in a separate run of 4 steps, the memory the model takes on the most loaded rank
  (:mod:`hvdllm.common.memory_probe`): TensorFlow's CPU allocator peak
  (``TF_CPU_ALLOCATOR_USE_BFC=true``), or for torch the resident
  high-water mark (``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave
  it).  Both less what the runtime itself allocates once training starts
  (thread pools, kernels, MPI buffers, lazily imported modules), which is
  not the model's: the same figure for a 16-wide model with the same layout,
  less the planner's prediction for that model (a few MiB).

and set them beside the planner's predictions: the memory error per layout
(target: within 20%) and the Spearman rank correlation of predicted and
measured step times (target: >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hvdllm.common import planner as P  # noqa: E402
from hvdllm.common.config import load_config  # noqa: E402

MODEL = ["model.family=gpt", "model.n_layer=4", "model.d_model=256", "model.n_head=8",
         "model.seq_len=256", "train.global_batch_size=16"]
TINY = ["model.d_model=16", "model.n_head=2"]
# (dp, tp, pp, micro_batch_size, schedule, virtual_stages, zero, recompute, sequence_parallel)
LAYOUTS = [
    (2, 1, 1, 1, "1f1b", 1, 0, "none", False),
    (2, 1, 1, 4, "1f1b", 1, 0, "none", False),
    (2, 1, 1, 8, "1f1b", 1, 0, "none", False),
    (2, 1, 1, 4, "1f1b", 1, 1, "none", False),
    (2, 1, 1, 4, "1f1b", 1, 0, "full", False),
    (1, 2, 1, 4, "1f1b", 1, 0, "none", False),
    (1, 2, 1, 4, "1f1b", 1, 0, "none", True),
    (1, 1, 2, 2, "1f1b", 1, 0, "none", False),
    (1, 1, 2, 2, "gpipe", 1, 0, "none", False),
    (1, 1, 2, 8, "1f1b", 1, 0, "none", False),
    (1, 1, 2, 2, "interleaved", 2, 0, "none", False),
]


from launch_common import mpirun, train_env  # noqa: E402  (benchmarks/)

_env = train_env
_mpirun = mpirun


def _train(framework: str, sets: list[str], steps: int, work: Path,
           memory: bool) -> tuple[float, float]:
    """(median step seconds, model memory of the most loaded rank in bytes, or 0).

    ``memory``: run with the measuring allocators.  They slow the run (torch
    maps and unmaps every large tensor: a tensor-parallel step ran 1.6x
    slower), so the step times come from runs without them.
    """
    if work.exists():
        shutil.rmtree(work)
    report = work / "memory"
    env = _env()
    cmd = [_mpirun(), "-np", "2", "--oversubscribe"]
    if memory:
        env.update({"MALLOC_MMAP_THRESHOLD_": "65536", "TF_CPU_ALLOCATOR_USE_BFC": "true",
                    "HVDLLM_MEMORY_REPORT": str(report)})
        for key in ("HVDLLM_MEMORY_REPORT", "MALLOC_MMAP_THRESHOLD_", "TF_CPU_ALLOCATOR_USE_BFC"):
            cmd += ["-x", key]
    cmd += [sys.executable, "-m", "hvdllm", "train", "--set", f"train.framework={framework}",
            "--set", f"train.steps={steps}", "--set", "train.log_every=1",
            "--set", "output.checkpoint=false", "--set", f"output.dir={work / 'run'}"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(sets)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][2:]
    cfg = load_config(None, sets + [f"train.framework={framework}"])
    per_step = cfg.train.global_batch_size * cfg.model.seq_len
    step = statistics.median(per_step / t for t in tokens)
    mems = [0.0]
    for f in report.glob("memory-rank-*.json"):
        data = json.loads(f.read_text())
        mems.append(data.get("allocator_peak_delta", data["rss_peak_delta"]))
    return step, max(mems)


def _layout(row) -> P.Layout:
    return P.Layout(*row)


def run_framework(framework: str, steps: int, rows, work: Path, repeats: int = 1,
                  keep: Path | None = None) -> list[dict]:
    cal = work / f"calibration-{framework}.json"
    subprocess.run([sys.executable, "-m", "hvdllm", "plan", "--calibrate", "--calibration",
                    str(cal), "--ranks-per-node", "2", "--set", f"train.framework={framework}"],
                   env=_env(), check=True, timeout=600, capture_output=True)
    hw = P.load_hardware(cal)
    if keep is not None:
        shutil.copy(cal, keep.with_name(f"{keep.stem}.calibration-{framework}.json"))
    cfg = load_config(None, MODEL + [f"train.framework={framework}"])
    out = []
    for i, row in enumerate(rows):
        lay = _layout(row)
        sets = MODEL + lay.overrides()
        _, mem = _train(framework, sets, 4, work / f"{framework}-{i}", memory=True)
        _, tiny = _train(framework, sets + TINY, 4, work / f"{framework}-{i}-tiny", memory=True)
        step, _ = _train(framework, sets, steps, work / f"{framework}-{i}", memory=False)
        tiny_cfg = load_config(None, MODEL + TINY + [f"train.framework={framework}"])
        base = tiny - P.predict_memory(tiny_cfg, lay, hw).model
        pred_mem = P.predict_memory(cfg, lay, hw).model
        pred_time = P.predict_time(cfg, lay, hw).total
        measured = mem - base
        res = {"framework": framework, "layout": lay.short(), "measured_step": step,
               "step_runs": [step], "predicted_step": pred_time, "measured_memory": measured,
               "runtime_memory": base, "predicted_memory": pred_mem,
               "memory_error": pred_mem / measured - 1 if measured > 0 else float("nan")}
        print(f"{framework:<10} {lay.short():<32} step {step * 1e3:8.1f} ms (pred "
              f"{pred_time * 1e3:8.1f})  memory {measured / 2**20:7.1f} MiB (pred "
              f"{pred_mem / 2**20:7.1f}, {res['memory_error'] * 100:+5.1f}%)", flush=True)
        out.append(res)
    # Further rounds over every layout in turn: a slow spell of the shared machine
    # then hits different layouts in different rounds, and the fastest round is kept.
    for r in range(1, repeats):
        for i, (row, res) in enumerate(zip(rows, out)):
            step, _ = _train(framework, MODEL + _layout(row).overrides(), steps,
                             work / f"{framework}-{i}", memory=False)
            res["step_runs"].append(step)
            res["measured_step"] = min(res["step_runs"])
            print(f"{framework:<10} {res['layout']:<32} round {r + 1}: step "
                  f"{step * 1e3:8.1f} ms (best {res['measured_step'] * 1e3:8.1f})", flush=True)
    _summary(framework, out)
    return out


def replay(path: Path) -> list[dict]:
    """The rows of an earlier ``--json`` run with the current planner's predictions,
    from the calibrations saved beside it: a change to the model is checked
    against the same measurements."""
    rows = json.loads(path.read_text())
    by_fw: dict[str, list[dict]] = {}
    for r in rows:
        by_fw.setdefault(r["framework"], []).append(r)
    layouts = {_layout(row).short(): _layout(row) for row in LAYOUTS}
    for framework, out in by_fw.items():
        hw = P.load_hardware(path.with_name(f"{path.stem}.calibration-{framework}.json"))
        cfg = load_config(None, MODEL + [f"train.framework={framework}"])
        for r in out:
            lay = layouts[r["layout"]]
            r["predicted_step"] = P.predict_time(cfg, lay, hw).total
            r["predicted_memory"] = P.predict_memory(cfg, lay, hw).model
            r["memory_error"] = r["predicted_memory"] / r["measured_memory"] - 1
            print(f"{framework:<10} {lay.short():<32} step {r['measured_step'] * 1e3:8.1f} ms "
                  f"(pred {r['predicted_step'] * 1e3:8.1f})  memory "
                  f"{r['measured_memory'] / 2**20:7.1f} MiB (pred "
                  f"{r['predicted_memory'] / 2**20:7.1f}, {r['memory_error'] * 100:+5.1f}%)")
        _summary(framework, out)
    return rows


def _summary(framework: str, out: list[dict]) -> None:
    rho = float("nan")
    if len(out) >= 2:
        rho = P.spearman([r["predicted_step"] for r in out], [r["measured_step"] for r in out])
    worst = max(abs(r["memory_error"]) for r in out)
    print(f"{framework}: Spearman {rho:.3f} (target >= 0.8); worst memory error "
          f"{worst * 100:.1f}% (target <= 20%)", flush=True)
    if len(out) >= 2 and max(len(r["step_runs"]) for r in out) > 1:
        # How much the machine's noise moves the figure: the rank correlation
        # with one round per layout, drawn at random, instead of each one's fastest.
        rng = random.Random(0)
        pred = [r["predicted_step"] for r in out]
        draws = sorted(P.spearman(pred, [rng.choice(r["step_runs"]) for r in out])
                       for _ in range(2000))
        print(f"{framework}: Spearman with one round per layout drawn at random: 10th "
              f"percentile {draws[200]:.3f}, median {draws[1000]:.3f}, 90th "
              f"{draws[1800]:.3f}", flush=True)
    for r in out:
        r["spearman"] = rho


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frameworks", default="torch,tensorflow")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layouts", type=int, default=len(LAYOUTS),
                    help="use the first N layouts of the list")
    ap.add_argument("--only", help="comma-separated indices into the layout list")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds over the layouts; each layout's fastest round counts")
    ap.add_argument("--json", help="write the rows here (and each calibration beside it)")
    ap.add_argument("--replay", metavar="JSON",
                    help="no runs: predict an earlier --json run's layouts again")
    args = ap.parse_args()
    if args.replay:
        replay(Path(args.replay))
        return 0
    work = Path(tempfile.mkdtemp(prefix="plan-check-"))
    rows = []
    try:
        for fw in args.frameworks.split(","):
            chosen = LAYOUTS[:args.layouts]
            if args.only:
                chosen = [LAYOUTS[int(i)] for i in args.only.split(",")]
            rows += run_framework(fw, args.steps, chosen, work, args.repeats,
                                  Path(args.json) if args.json else None)
            if args.json:  # after each framework: a failure later loses nothing
                Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
