"""Tensor-parallel step time: hvdllm tp=2 against tp=1 and against PyTorch DTensor.

    python benchmarks/tp_speed.py [--rounds 2] [--steps 8] [--d-model 1024] [--quick]

Sides, all training the same LLaMA model (hvdllm's reference model, same
seed, same batch, AdamW) for whole steps (forward, backward, optimizer):

* ``tp1_1thread``: hvdllm, one process, 1 intra-op thread (one core, the
  share each rank gets in the tp=2 job);
* ``tp1_2threads``: hvdllm, one process, 2 threads (the whole machine);
* ``hvdllm_tp2``: hvdllm, ``mpirun -np 2``, tp=2, 1 thread per rank;
* ``dtensor_tp2``: ``torch.distributed.tensor.parallel`` on gloo,
  ``mpirun -np 2``, 1 thread per rank, Megatron plan on the blocks.

Every side is its own job; the sides run one after another in rounds whose
order alternates (A B C D, D C B A, ...), and each side's figure is the
median over rounds of its median step time.  Ratios are printed against
peers measured in the same run.
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
WORKER = HERE / "tp_speed_worker.py"


def run_side(name: str, settings: dict, timeout: float) -> float:
    side, np_, threads = {"tp1_1thread": ("hvdllm", 1, 1), "tp1_2threads": ("hvdllm", 1, 2),
                          "hvdllm_tp2": ("hvdllm", 2, 1), "dtensor_tp2": ("dtensor", 2, 1)}[name]
    cmd = [sys.executable, str(WORKER), side, json.dumps(dict(settings, threads=threads))]
    if np_ > 1 or side == "dtensor":
        mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
        cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none"] + cmd
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS=str(threads))
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"side {name} failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(lines[-1])["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="tiny model, a smoke test")
    args = ap.parse_args()
    settings = {"n_layer": 2, "n_head": 16, "d_model": args.d_model, "seq_len": 128, "batch": 2,
                "warmup": 2, "steps": args.steps, "port": 29611}
    if args.quick:
        settings.update(d_model=128, n_head=4, steps=3, warmup=1)
    sides = ["tp1_1thread", "tp1_2threads", "hvdllm_tp2", "dtensor_tp2"]
    samples: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for name in (sides if r % 2 == 0 else sides[::-1]):
            settings["port"] += 1
            samples[name].append(run_side(name, settings, timeout=900))
            print(f"round {r + 1}: {name:<13} {samples[name][-1] * 1e3:9.1f} ms/step", flush=True)
    med = {s: statistics.median(v) for s, v in samples.items()}
    print(f"\nLLaMA d_model={settings['d_model']} n_layer={settings['n_layer']} "
          f"seq_len={settings['seq_len']} batch={settings['batch']}; median step time over "
          f"{args.rounds} rounds of {settings['steps']} steps")
    for s in sides:
        print(f"  {s:<13} {med[s] * 1e3:9.1f} ms")
    print(f"speedup tp=2 vs tp=1 (1 thread):   {med['tp1_1thread'] / med['hvdllm_tp2']:.2f}x "
          f"(target >= 1.5)")
    print(f"speedup tp=2 vs tp=1 (2 threads):  {med['tp1_2threads'] / med['hvdllm_tp2']:.2f}x")
    print(f"hvdllm tp=2 / DTensor tp=2:        {med['hvdllm_tp2'] / med['dtensor_tp2']:.2f} "
          f"(target <= 1.0)")


if __name__ == "__main__":
    main()
