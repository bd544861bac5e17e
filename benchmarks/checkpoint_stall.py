"""What a checkpoint save costs the training path, against torch DCP's ``async_save``.

    python benchmarks/checkpoint_stall.py [--reps 5] [--models demo,large] [--resume-rounds 3]
        [--json FILE] [--quick]

torch, fp32, AdamW, dp=2 (``mpirun -np 2 --oversubscribe``), on the demo
model (``configs/demo.toml``'s model section) and a larger GPT (8 layers,
d_model 768, 12 heads, seq_len 128, vocab 256: 57.0M parameters).  For each
model, one MPI job (``benchmarks/checkpoint_stall_worker.py``) builds the
engine as ``hvdllm train`` does and measures, all as the slowest rank:

1. the step time: the median of the steps timed with nothing in flight,
   after warm-up (before the saves, and 2 after them);
2. **hvdllm stall**: the training thread's time in ``engine.capture_state()``
   + ``CheckpointManager.save(...)`` (which hands the write and commit to a
   background thread), as ``RunCheckpoints._save`` does it;
3. **peer stall**: ``torch.distributed.checkpoint.async_save`` of
   ``{"model": model.state_dict(), "optim": optimizer.state_dict()}`` over
   a gloo process group of the same two ranks, until it returns.

Every save is waited for before the next (``manager.wait()`` /
``future.result()``, not counted in the stall); hvdllm and peer
repetitions alternate, the side that goes first flipping every repetition,
and the first repetition of each is warm-up.  Targets: hvdllm stall <= 0.5
of a step, and hvdllm stall / peer stall <= 1.0.  For context the worker
also times a bare numpy copy of the same tensors, the whole save (start to
committed), and one step taken while each side's save is still being
written.

4. **Resume time**: ``hvdllm train`` via the CLI under ``mpirun -np 2``:
   a fresh run of 3 steps with ``output.checkpoint_every = 2`` (so
   ``step-00000002`` is saved in the background), then the same command
   with ``train.steps = 4``, which resumes from it.  The time from launching
   ``mpirun`` to the first step's line in ``metrics.jsonl`` (polled every
   20 ms; ``train.log_every = 1``) is reported for both, with the ratio,
   and the times at which rank 0 printed that the engine was built and
   (resume) that the checkpoint was loaded.

Prints one table of figures and ratios (MISS next to a missed target);
exits non-zero only when a run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dp_depth import env, mpirun  # the launch environment the other benchmarks use

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "checkpoint_stall_worker.py"

# Micro-batch per rank; steps timed with nothing in flight after warm-up steps (the
# demo model's first steps run 2x slower here, so it warms up longer).
MODELS = {
    "demo": {"model": [], "micro_batch": 8, "warmup_steps": 10, "steps": 10},  # 16 per step
    "large": {"model": ["model.n_layer=8", "model.d_model=768", "model.n_head=12"],
              "micro_batch": 2, "warmup_steps": 2, "steps": 4},
}
STALL_TARGET = 0.5
PEER_TARGET = 1.0


class BenchError(Exception):
    """A run failed: the message says which and shows its output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(name: str, settings: dict, timeout: float) -> dict:
    e = env()
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    cmd = mpirun(2) + [sys.executable, str(WORKER), json.dumps(settings)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"worker for {name} did not finish within {timeout:g}s") from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise BenchError(f"worker for {name} failed (exit {res.returncode}):\n"
                         f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def train_cli(model: dict, out: Path, steps: int, timeout: float) -> dict:
    """Launch ``hvdllm train``; seconds from launch to rank 0's milestones and the first step."""
    mb = model["micro_batch"]
    sets = [*model["model"], "parallel.dp=2", f"train.micro_batch_size={mb}",
            f"train.global_batch_size={2 * mb}", f"train.steps={steps}", "train.log_every=1",
            "train.sample_tokens=0", "output.checkpoint_every=2", "output.checkpoint=false",
            f"output.dir={out}"]
    cmd = mpirun(2) + [sys.executable, "-m", "hvdllm", "train", "--config",
                       str(REPO / "configs" / "demo.toml")]
    for item in sets:
        cmd += ["--set", item]
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # a resumed run rewrites it; look only at new lines
    marks: dict[str, float] = {}
    output: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(env(), PYTHONUNBUFFERED="1"))

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            now = time.perf_counter() - start
            output.append(line)
            if " parameters; world " in line:
                marks.setdefault("engine_built", now)
            elif line.startswith("hvdllm: resuming from"):
                marks.setdefault("restored", now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first = None
    deadline = start + timeout
    while proc.poll() is None and time.perf_counter() < deadline:
        if first is None and metrics.is_file():
            text = metrics.read_text()
            if text.endswith("\n"):  # a whole first record
                first = time.perf_counter() - start
                record = json.loads(text.splitlines()[0])
                marks["first_step_no"] = record["step"]
                marks["first_step_in_loop"] = record["elapsed_sec"]
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise BenchError(f"hvdllm train did not finish within {timeout:g}s: {' '.join(cmd)}")
    reader.join(10)
    if proc.returncode != 0 or first is None:
        raise BenchError(f"hvdllm train failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{''.join(output)[-3000:]}")
    marks["first_step"] = first
    return marks


def med(values: list[float]) -> float:
    return statistics.median(values)


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed saves per side (plus 1 warm-up)")
    ap.add_argument("--inflight-reps", type=int, default=2,
                    help="steps timed while a save of each side is in flight")
    ap.add_argument("--models", default="demo,large")
    ap.add_argument("--resume-rounds", type=int, default=3,
                    help="fresh + resume pairs of `hvdllm train` per model (0 = skip)")
    ap.add_argument("--json", metavar="FILE", help="also save every sample to FILE")
    ap.add_argument("--quick", action="store_true",
                    help="demo model only, 2 repetitions, 1 resume round: a smoke test")
    args = ap.parse_args()
    models = {name: dict(m) for name, m in MODELS.items()}
    if args.quick:
        args.models, args.reps, args.inflight_reps, args.resume_rounds = "demo", 2, 1, 1
        models["demo"].update(warmup_steps=2, steps=2)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown or args.reps < 1 or args.inflight_reps < 1:
        ap.error(f"--models takes {', '.join(MODELS)}; --reps and --inflight-reps must be >= 1")
    print(f"load average before: {load()}", flush=True)
    results: dict[str, dict] = {}
    resumes: dict[str, dict[str, list]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hvdllm-ckpt-bench-") as tmp:
            for name in names:
                settings = dict(models[name], dir=str(Path(tmp) / name), save_reps=args.reps,
                                inflight_reps=args.inflight_reps)
                t0 = time.perf_counter()
                r = results[name] = run_worker(name, settings, timeout=1200)
                print(f"{name}: {r['num_params']:,} parameters; step {1e3 * r['median_step']:.1f}"
                      f" ms; hvdllm stall {1e3 * med([x['stall'] for x in r['hvdllm']]):.1f} ms;"
                      f" DCP stall {1e3 * med([x['stall'] for x in r['dcp']]):.1f} ms "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            for name in names if args.resume_rounds > 0 else []:
                resumes[name] = {"fresh": [], "resume": []}
                for rnd in range(args.resume_rounds):
                    out = Path(tmp) / f"cli-{name}-{rnd}"
                    fresh = train_cli(MODELS[name], out, steps=3, timeout=900)
                    resumed = train_cli(MODELS[name], out, steps=4, timeout=900)
                    if resumed.get("first_step_no") != 3 or "restored" not in resumed:
                        raise BenchError(f"the second run of {name} did not resume from step 2 "
                                         f"({resumed})")
                    resumes[name]["fresh"].append(fresh)
                    resumes[name]["resume"].append(resumed)
                    print(f"{name} round {rnd + 1}: first step after {fresh['first_step']:.2f} s "
                          f"fresh, {resumed['first_step']:.2f} s resumed", flush=True)
    except BenchError as exc:
        print(f"checkpoint_stall: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"load average after: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"stall": results, "resume": resumes}, indent=1))
    report(results, resumes, models, args)
    return 0


def report(results: dict, resumes: dict, models: dict, args: argparse.Namespace) -> None:
    ms = lambda v: f"{1e3 * v:.1f}"  # noqa: E731
    steps = ", ".join(f"{name} {models[name]['steps']} + 2" for name in results)
    print(f"\nCheckpoint save stall: torch fp32 AdamW, dp=2 (mpirun -np 2), slowest rank; "
          f"medians of {args.reps} saves per side (after 1 warm-up) and of the steps timed "
          f"with nothing in flight, before + after the saves ({steps})")
    print("| model | parameters | step (ms) | hvdllm stall (ms) | of it capture_state (ms) "
          f"| hvdllm stall / step (target <= {STALL_TARGET}) | DCP async_save stall (ms) "
          f"| DCP stall / step | hvdllm / DCP stall (target <= {PEER_TARGET}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        step = r["median_step"]
        hv = med([x["stall"] for x in r["hvdllm"]])
        cap = med([x["capture"] for x in r["hvdllm"]])
        peer = med([x["stall"] for x in r["dcp"]])
        print(f"| {name} | {r['num_params']:,} | {ms(step)} | {ms(hv)} | {ms(cap)} | "
              f"{hv / step:.3f} {verdict(hv / step, STALL_TARGET)} | {ms(peer)} | "
              f"{peer / step:.3f} | {hv / peer:.3f} {verdict(hv / peer, PEER_TARGET)} |")
    print("\nContext (no target): bytes saved, whole save (start to committed), a step taken "
          "while the save is written, and a bare numpy copy of the same tensors on rank 0")
    print("| model | hvdllm bytes per rank | hvdllm on disk | DCP on disk | hvdllm save to commit "
          "(ms) | DCP save to done (ms) | step (ms) during hvdllm write | during DCP write | "
          "step (ms) again after | numpy copy, fresh buffers (ms) | into kept buffers (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {' / '.join(f'{b:,}' for b in r['hvdllm_rank_bytes'])} | "
              f"{r['hvdllm_dir_bytes']:,} | {r['dcp_dir_bytes']:,} | "
              f"{ms(med([x['commit'] for x in r['hvdllm']]))} | "
              f"{ms(med([x['commit'] for x in r['dcp']]))} | "
              f"{ms(med(r['inflight']['hvdllm']))} | {ms(med(r['inflight']['dcp']))} | "
              f"{ms(med(r['steps_after']))} | {ms(med(r['copy_fresh']))} | "
              f"{ms(med(r['copy_reused']))} |")
    if resumes:
        print(f"\nResume: `hvdllm train` under mpirun -np 2, seconds from launch to the first "
              f"step in metrics.jsonl (median of {args.resume_rounds} round(s); fresh = steps 1-3"
              f" with checkpoint_every 2, resume = the same run to step 4 from step-00000002)")
        print("| model | fresh: engine built | fresh: first step | resume: engine built | "
              "resume: checkpoint loaded | resume: first step | resume / fresh |")
        print("|---|---|---|---|---|---|---|")
        loads = {}
        for name, by in resumes.items():
            def m(kind: str, key: str) -> float:
                vals = [x[key] for x in by[kind] if key in x]
                return med(vals) if vals else float("nan")

            fresh, res = m("fresh", "first_step"), m("resume", "first_step")
            print(f"| {name} | {m('fresh', 'engine_built'):.2f} | {fresh:.2f} | "
                  f"{m('resume', 'engine_built'):.2f} | {m('resume', 'restored'):.2f} | "
                  f"{res:.2f} | {res / fresh:.3f} |")
            loads[name] = med([x["restored"] - x["engine_built"] for x in by["resume"]])
        print("Loading the checkpoint (engine built to checkpoint loaded, resume runs): "
              + ", ".join(f"{name} {v:.2f} s" for name, v in loads.items()))


if __name__ == "__main__":
    sys.exit(main())
