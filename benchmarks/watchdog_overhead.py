"""The hang watchdog's cost on the training path: steps with and without it.

    python benchmarks/watchdog_overhead.py [--rounds 6] [--steps 210] [--frameworks torch,tensorflow]
        [--worlds 1,2]

For each framework, a world-1 run (one process) and a dp=2 run (``mpirun -np
2``) of the demo model (``configs/demo.toml``) train ``--steps`` steps with
``parallel.watchdog = true`` and ``false``.  The step time is read from
``metrics.jsonl`` (``elapsed_sec`` between the 10th and the last step, so
start-up and tracing are left out).  On and off alternate within each
round, and their order flips every round (the rounds must be even, so
each order counts as often: the first run of a pair is measurably
slower here), so drift on a shared machine falls on both; the ratio
on/off is taken per round and the median over rounds is reported.
Target: at most 1.01 (1% overhead).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dp_depth import env  # the launch environment the other benchmarks use

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEP = 10


def step_time(framework: str, world: int, watchdog: bool, steps: int, out: Path) -> float:
    """Seconds per step after warm-up, from one ``hvdllm train`` run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "hvdllm", "train", "--config", str(REPO / "configs" / "demo.toml")]
    if world > 1:
        mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
        cmd = [mpirun, "-np", str(world), "--oversubscribe"] + cmd
    for item in (f"parallel.dp={world}", f"train.framework={framework}", f"train.steps={steps}",
                 f"parallel.watchdog={'true' if watchdog else 'false'}", "train.log_every=10",
                 "train.sample_tokens=0", "output.checkpoint=false", f"output.dir={out}"):
        cmd += ["--set", item]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    last = max(rows)
    return (rows[last]["elapsed_sec"] - rows[WARMUP_STEP]["elapsed_sec"]) / (last - WARMUP_STEP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=210)
    ap.add_argument("--frameworks", default="torch,tensorflow")
    ap.add_argument("--worlds", default="1,2", help="world sizes to run (dp = world)")
    args = ap.parse_args()
    if args.rounds < 2 or args.rounds % 2:
        raise SystemExit("--rounds must be even (each on/off order equally often)")
    if args.steps <= WARMUP_STEP:
        raise SystemExit(f"--steps must exceed {WARMUP_STEP}")
    cases = [(fw, int(world)) for fw in args.frameworks.split(",")
             for world in args.worlds.split(",")]
    times: dict[tuple, dict[bool, list[float]]] = {c: {True: [], False: []} for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for case in cases:
                for watchdog in ((True, False) if r % 2 == 0 else (False, True)):
                    t = step_time(*case, watchdog, args.steps, Path(tmp) / "run")
                    times[case][watchdog].append(t)
                    print(f"round {r + 1} {case[0]} world {case[1]} watchdog "
                          f"{'on ' if watchdog else 'off'}: {1e3 * t:.2f} ms/step", flush=True)
    print("\n| framework | world | step off (ms) | step on (ms) | on/off (median of rounds) "
          "| target <= 1.01 |")
    print("|---|---|---|---|---|---|")
    for (fw, world), by in times.items():
        ratios = [on / off for on, off in zip(by[True], by[False])]
        ratio = statistics.median(ratios)
        print(f"| {fw} | {world} | {1e3 * statistics.median(by[False]):.2f} | "
              f"{1e3 * statistics.median(by[True]):.2f} | {ratio:.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}) | "
              f"{'PASS' if ratio <= 1.01 else 'MISS'} |")


if __name__ == "__main__":
    main()
