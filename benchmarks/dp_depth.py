"""Data-parallel depth: compression convergence and wire bytes, ZeRO-1 memory, overlap.

    python benchmarks/dp_depth.py [--steps 300] [--modes none,fp16,bf16,topk,powersgd] [--quick]

A mode ``NAME@mW`` (e.g. ``topk@m100``) runs ``train.compression = NAME``
with ``train.compression_target = "momentum"`` and ``W`` warm-up steps
(1-bit Adam's scheme); ``NAME@wW`` keeps the gradient target with
``train.compression_warmup_steps = W``.

1. **Compression.** The demo model (``configs/demo.toml``) trains for
   ``--steps`` steps at dp=2 (``mpirun -np 2``) once per
   ``train.compression``; the table gives the final loss (mean of the last
   3 logged losses, which smooths batch noise) and its gap to "none", the
   bytes each rank sent per step (``comm_bytes`` from ``metrics.jsonl``,
   at the last step and averaged over the logged steps, warm-up included)
   and the step time, both as ratios to "none" measured in the same run.
   Targets: within 3% of "none" for fp16, bf16, powersgd; 5% for topk 1%.
2. **ZeRO-1 memory.** Optimizer-state bytes per rank (AdamW moments, plus
   the fp32 master shard ZeRO keeps) with ``train.zero = 0`` and ``1`` at
   dp=2 and dp=4, from ``benchmarks/dp_depth_worker.py``.
3. **Overlap.** In the torch path with ``compression = "none"``, the
   gradient allreduces start inside backward; the worker measures the time
   ``wait()`` still blocks after backward (exposed) against the time the
   same allreduces take when started only after backward (the whole
   sync), so hidden fraction = 1 - exposed / whole.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    if os.geteuid() == 0:
        out.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return out


def mpirun(np_: int) -> list[str]:
    exe = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    return [exe, "-np", str(np_), "--oversubscribe"]


def mode_sets(spec: str) -> list[str]:
    """``--set`` items for a mode spec: ``NAME``, ``NAME@mW`` or ``NAME@wW``."""
    name, _, extra = spec.partition("@")
    sets = [f"train.compression={name}"]
    if extra:
        if extra[0] not in "mw" or not extra[1:].isdigit():
            raise SystemExit(f"bad mode {spec!r}: expected NAME, NAME@mSTEPS or NAME@wSTEPS")
        sets.append(f"train.compression_warmup_steps={int(extra[1:])}")
        if extra[0] == "m":
            sets.append("train.compression_target=momentum")
    return sets


def train(mode: str, steps: int, out: Path, quick: bool) -> list[dict]:
    sets = ["parallel.dp=2", f"train.steps={steps}", *mode_sets(mode),
            "train.sample_tokens=0", "train.log_every=10", f"output.dir={out}",
            "output.checkpoint=false"]
    if quick:
        sets += ["model.n_layer=2", "model.d_model=64", "model.seq_len=64", "train.log_every=5"]
    cmd = mpirun(2) + [sys.executable, "-m", "hvdllm", "train", "--config",
                       str(REPO / "configs" / "demo.toml")]
    for item in sets:
        cmd += ["--set", item]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def worker(*args: str, np_: int) -> dict:
    cmd = mpirun(np_) + [sys.executable, str(HERE / "dp_depth_worker.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"worker {args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--modes", default="none,fp16,bf16,topk,powersgd")
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test")
    ap.add_argument("--skip-training", action="store_true", help="only ZeRO memory and overlap")
    args = ap.parse_args()
    steps = 20 if args.quick else args.steps
    if not args.skip_training:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for mode in args.modes.split(","):
                recs = train(mode, steps, Path(tmp) / mode, args.quick)
                final = sum(r["loss"] for r in recs[-3:]) / 3
                # From the first logged step on: start-up and compilation excluded.
                sec_per_step = ((recs[-1]["elapsed_sec"] - recs[0]["elapsed_sec"])
                                / max(1, recs[-1]["step"] - recs[0]["step"]))
                results[mode] = {"final_loss": final, "comm_bytes": recs[-1]["comm_bytes"],
                                 "mean_bytes": sum(r["comm_bytes"] for r in recs) / len(recs),
                                 "sec_per_step": sec_per_step}
                print(f"{mode:<9} final loss {final:.4f}  comm_bytes/step "
                      f"{recs[-1]['comm_bytes']:,}  {sec_per_step * 1e3:.1f} ms/step", flush=True)
        base = results.get("none")
        print(f"\nCompression, demo model, dp=2, {steps} steps")
        print("| compression | final loss | vs none | bytes/step/rank | bytes vs none | "
              "run-mean bytes vs none | step time vs none |")
        print("|---|---|---|---|---|---|---|")
        for mode, r in results.items():
            gap = (r["final_loss"] / base["final_loss"] - 1) * 100 if base else float("nan")
            wire = r["comm_bytes"] / base["comm_bytes"] if base else float("nan")
            mean_wire = r["mean_bytes"] / base["mean_bytes"] if base else float("nan")
            step = r["sec_per_step"] / base["sec_per_step"] if base else float("nan")
            print(f"| {mode} | {r['final_loss']:.4f} | {gap:+.2f}% | {r['comm_bytes']:,} | "
                  f"{wire:.3f} | {mean_wire:.3f} | {step:.2f} |")
    print("\nZeRO-1 optimizer state per rank (demo model)")
    for dp in (2, 4):
        m = worker("memory", np_=dp)
        print(f"  dp={dp}: unsharded AdamW moments {m['unsharded_bytes']:,} B; ZeRO-1 moments "
              f"{m['zero_moment_bytes']:,} B ({m['zero_moment_bytes'] / m['unsharded_bytes']:.3f}x)"
              f" + fp32 master shard {m['zero_master_bytes']:,} B")
    o = worker("overlap", np_=2)
    print(f"\nOverlap (torch, dp=2, demo model): whole gradient sync {o['whole_ms']:.2f} ms, "
          f"exposed after backward {o['exposed_ms']:.2f} ms; hidden fraction "
          f"{1 - o['exposed_ms'] / o['whole_ms']:.2f}")


if __name__ == "__main__":
    main()
