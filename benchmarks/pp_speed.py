"""Pipeline-parallel step time: hvdllm pp=2 against one process and torch.distributed.pipelining.

    python benchmarks/pp_speed.py [--rounds 3] [--steps 6] [--schedules 1f1b,gpipe] [--quick]

Every side trains the same LLaMA model (hvdllm's reference model, same seed,
same global batch of ``m`` micro-batches, AdamW) for whole steps (forward,
backward, optimizer):

* ``single_1thread`` / ``single_2threads``: hvdllm, one process (pp=1), the
  ``m`` micro-batches accumulated, with 1 intra-op thread (one core, what
  each pipeline rank gets) or 2 (the whole machine);
* ``hvdllm_pp2_<schedule>``: hvdllm, ``mpirun -np 2``, pp=2, 1 thread per
  rank, built as ``hvdllm train`` builds it;
* ``torch_pp2_1f1b``: ``torch.distributed.pipelining.Schedule1F1B`` on gloo,
  ``mpirun -np 2``, the same two stages (uniform split) and micro-batches.

Every side is its own job.  The sides run one after another in rounds whose
order alternates (A B C D, D C B A, ...), and each side's figure is the
median over rounds of its median step time, so load from other processes
hits all sides alike.  Multi-rank step times are the slowest rank's, after
a barrier.  Ratios are against peers measured in the same run.

Also reported: the bubble of hvdllm's 1F1B step, measured (each stage's
share of the pipeline step not spent computing, averaged over stages)
against theory ``(p-1)/(m+p-1)``, and the peak bytes of activations saved
for backward on each stage under GPipe, 1F1B and interleaved (v=2).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "pp_speed_worker.py"


def run_side(name: str, settings: dict, timeout: float) -> dict:
    """Launch one side; return the JSON its rank 0 prints."""
    side = name.split("_")[0]  # single, hvdllm, torch or memory
    threads = 2 if name == "single_2threads" else 1
    np_ = 1 if side == "single" else 2
    if side == "hvdllm":
        schedule = name.split("_")[-1]
        settings = dict(settings, schedule=schedule,
                        virtual_stages=2 if schedule == "interleaved" else 1)
    cmd = [sys.executable, str(WORKER), side, json.dumps(dict(settings, threads=threads))]
    if np_ > 1:
        mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
        cmd = [mpirun, "-np", str(np_), "--oversubscribe"] + cmd
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS=str(threads))
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"side {name} failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side and round")
    ap.add_argument("--schedules", default="1f1b",
                    help="hvdllm schedules to time, comma-separated (1f1b always)")
    ap.add_argument("--quick", action="store_true", help="tiny model, a smoke test")
    ap.add_argument("--json", help="also write every sample to this file")
    args = ap.parse_args()
    settings = {"n_layer": 8, "n_head": 4, "d_model": 256, "seq_len": 128, "micro_batch": 2,
                "microbatches": 8, "warmup": 2, "steps": args.steps, "port": 29711}
    if args.quick:
        settings.update(n_layer=4, d_model=64, seq_len=32, steps=2, warmup=1)
    schedules = ["1f1b"] + [s for s in args.schedules.split(",") if s and s != "1f1b"]
    sides = (["single_1thread", "single_2threads"] + [f"hvdllm_pp2_{s}" for s in schedules]
             + ["torch_pp2_1f1b"])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for name in (sides if r % 2 == 0 else sides[::-1]):
            settings["port"] += 1
            results[name].append(run_side(name, settings, timeout=900))
            print(f"round {r + 1}: {name:<22} {results[name][-1]['median'] * 1e3:9.1f} ms/step",
                  flush=True)
    memory = run_side("memory", settings, timeout=900)
    med = {s: statistics.median(r["median"] for r in v) for s, v in results.items()}
    p, m = 2, settings["microbatches"]
    hv = results["hvdllm_pp2_1f1b"]
    bubble = statistics.median(statistics.mean(r["stage_bubble"]) for r in hv)
    print(f"\nLLaMA d_model={settings['d_model']} n_layer={settings['n_layer']} "
          f"seq_len={settings['seq_len']}; {m} micro-batches of {settings['micro_batch']} "
          f"sequences per step; median step time over {args.rounds} rounds of "
          f"{settings['steps']} steps")
    print(f"hvdllm {hv[0]['split']}")
    for s in sides:
        print(f"  {s:<22} {med[s] * 1e3:9.1f} ms")
    ideal = p * m / (m + p - 1)
    print(f"speedup pp=2 (1f1b) vs one process, 1 thread:  "
          f"{med['single_1thread'] / med['hvdllm_pp2_1f1b']:.2f}x (ideal {ideal:.2f}x, "
          f"target >= 1.6)")
    print(f"speedup pp=2 (1f1b) vs one process, 2 threads: "
          f"{med['single_2threads'] / med['hvdllm_pp2_1f1b']:.2f}x")
    print(f"bubble of hvdllm 1f1b, measured: {bubble:.1%} (theory (p-1)/(m+p-1) = "
          f"{(p - 1) / (m + p - 1):.1%}; stages {[f'{b:.1%}' for b in hv[-1]['stage_bubble']]} "
          f"in the last round)")
    print(f"hvdllm pp=2 / torch.distributed.pipelining pp=2 (1f1b): "
          f"{med['hvdllm_pp2_1f1b'] / med['torch_pp2_1f1b']:.2f} (target <= 1.0)")
    for s in schedules[1:]:
        print(f"hvdllm {s} / hvdllm 1f1b step time: "
              f"{med[f'hvdllm_pp2_{s}'] / med['hvdllm_pp2_1f1b']:.2f}")
    print("peak activation memory saved for backward, per stage (MiB):")
    for name, peaks in memory.items():
        print(f"  {name:<15} " + "  ".join(f"stage {i}: {b / 2**20:7.2f}"
                                            for i, b in enumerate(peaks)))
    g, f = memory["gpipe_v1"], memory["1f1b_v1"]
    print(f"GPipe / 1F1B peak on stage 0: {g[0] / f[0]:.2f} (theory m/p = {m / p:.1f}); on "
          f"stage 1: {g[1] / f[1]:.2f} (theory m/1 = {m})")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results,
                                               "memory": memory}, indent=1))


if __name__ == "__main__":
    main()
