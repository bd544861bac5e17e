"""TensorFlow as a peer of torch: tp=2 and pp=2 speedups, and TF/torch step time.

    python benchmarks/tf_peer.py [--rounds 2] [--steps 5] [--only tp|pp] [--quick]

Every side trains the same LLaMA model (same seed, same global batch,
AdamW) for whole steps, each side its own job, built as ``hvdllm train``
builds it:

* ``tf_1thread``: TensorFlow, one process, 1 intra-op thread (one core: the
  share each rank of a 2-rank job gets);
* ``tf_tp2`` / ``torch_tp2``: ``mpirun -np 2``, tp=2, 1 thread per rank;
* ``tf_pp2`` / ``torch_pp2``: ``mpirun -np 2``, pp=2 (1F1B), m=8
  micro-batches, 1 thread per rank;
* ``tf_1thread_m8``: one process, the same 8 micro-batches accumulated.

The tensor-parallel sides use one micro-batch per step of a wide model
(d_model 1024), the pipeline sides 8 micro-batches of a deeper one; each
figure is the median over rounds (alternating order) of a side's median
step time.  Ratios are against peers measured in the same run.
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
WORKER = HERE / "tf_peer_worker.py"
TP_MODEL = {"n_layer": 2, "n_head": 16, "d_model": 1024, "seq_len": 128, "micro_batch": 2,
            "micro": 1}
PP_MODEL = {"n_layer": 8, "n_head": 4, "d_model": 256, "seq_len": 128, "micro_batch": 2,
            "micro": 8}
SIDES = {  # name: (framework, tp, pp, threads, model)
    "tf_1thread": ("tensorflow", 1, 1, 1, TP_MODEL),
    "tf_tp2": ("tensorflow", 2, 1, 1, TP_MODEL),
    "torch_tp2": ("torch", 2, 1, 1, TP_MODEL),
    "tf_1thread_m8": ("tensorflow", 1, 1, 1, PP_MODEL),
    "tf_pp2": ("tensorflow", 1, 2, 1, PP_MODEL),
    "torch_pp2": ("torch", 1, 2, 1, PP_MODEL),
}


def run_side(name: str, common: dict, timeout: float) -> float:
    fw, tp, pp, threads, model = SIDES[name]
    settings = dict(common, **model, framework=fw, tp=tp, pp=pp, threads=threads,
                    schedule="1f1b")
    cmd = [sys.executable, str(WORKER), json.dumps(settings)]
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    cmd = [mpirun, "-np", str(tp * pp), "--oversubscribe", "--bind-to", "none"] + cmd
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
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny models, a smoke test")
    ap.add_argument("--only", choices=("tp", "pp"), help="run the tp or the pp sides only")
    args = ap.parse_args()
    common = {"warmup": 2, "steps": args.steps}
    if args.quick:
        TP_MODEL.update(d_model=128, n_head=4)
        PP_MODEL.update(n_layer=4, d_model=64, seq_len=32)
        common.update(warmup=1, steps=2)
    sides = [s for s in SIDES if args.only is None
             or (SIDES[s][4] is TP_MODEL) == (args.only == "tp")]
    samples: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for name in (sides if r % 2 == 0 else sides[::-1]):
            samples[name].append(run_side(name, common, timeout=1200))
            print(f"round {r + 1}: {name:<14} {samples[name][-1] * 1e3:9.1f} ms/step", flush=True)
    med = {s: statistics.median(v) for s, v in samples.items()}
    print(f"\ntp sides: LLaMA {TP_MODEL}; pp sides: LLaMA {PP_MODEL}; median step time over "
          f"{args.rounds} rounds of {common['steps']} steps")
    for s in sides:
        print(f"  {s:<14} {med[s] * 1e3:9.1f} ms")
    if "tf_tp2" in med:
        print(f"TF tp=2 speedup over 1 thread:      {med['tf_1thread'] / med['tf_tp2']:.2f}x "
              f"(target >= 1.5)")
        print(f"TF / torch step time, tp=2:         {med['tf_tp2'] / med['torch_tp2']:.2f} "
              f"(target <= 1.3)")
    if "tf_pp2" in med:
        print(f"TF pp=2 (m=8) speedup over 1 thread: {med['tf_1thread_m8'] / med['tf_pp2']:.2f}x "
              f"(target >= 1.6)")
        print(f"TF / torch step time, pp=2:         {med['tf_pp2'] / med['torch_pp2']:.2f} "
              f"(target <= 1.3)")


if __name__ == "__main__":
    main()
