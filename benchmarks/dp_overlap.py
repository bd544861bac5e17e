"""How much of the data-parallel gradient sync backward hides (torch, compression "none").

    python benchmarks/dp_overlap.py [--dp 2,4] [--bind core,none] [--bucket-kb 4096,1024]
        [--trials 24] [--quick]

For each dp (ranks on this host, ``mpirun -np DP --oversubscribe``) and
each CPU binding of the ranks (``mpirun --bind-to core``: each rank, its
compute thread and the gradient communication thread share one core; ``none``:
the OS may run any thread on any core), a worker builds the demo model
(``configs/demo.toml``, global batch 16, so 16/dp sequences a rank) and,
per gradient-bucket size, a :class:`~hvdllm.torch.data_parallel.GradientSync`
through its public API.  Each trial times, every step started by a barrier:

* **sequential step**: forward + backward outside ``sync.sync()``, then
  ``wait()``, which starts every bucket's allreduce only now;
* **overlapped step**: forward + backward inside ``sync.sync()`` (a
  bucket's allreduce starts as soon as backward has finished its
  gradients), then ``wait()``;
* **whole sync**: forward + backward outside ``sync()``, a barrier, then
  ``wait()`` alone: the bare sync, for reference.

The ranks share one host and so one monotonic clock: for both steps the
worker takes the **sync after backward**, from the moment the *last* rank
finishes backward to the moment the last rank's ``wait()`` returns: the
part of the sync on the step's critical path, free of the skew between
the ranks' backward passes.  hidden fraction = 1 - (sync after backward,
overlapped) / (sync after backward, sequential).  The two steps alternate
in order from trial to trial; figures are medians over the trials after 2
warm-up ones (the slowest rank's for step times).  Step times are
compared with the sequential step and with the default setting (first
``--bind``, first ``--bucket-kb``) at the same dp.  ``--worker`` runs one worker (under mpirun).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BINDS = ("core", "none")


# -- worker (one per rank) -----------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from hvdllm.common.config import load_config
    from hvdllm.common.launch import world_comm
    from hvdllm.common.topology import Topology
    from hvdllm.torch.data_parallel import GradientSync
    from hvdllm.torch.distributed import init_groups
    from hvdllm.torch.engine import build_engine

    comm = world_comm()
    dp = comm.Get_size()
    torch.set_num_threads(args.threads)
    groups = init_groups(Topology(dp), comm, 300.0)
    sets = [f"parallel.dp={dp}", f"train.micro_batch_size={16 // dp}"]
    if args.quick:
        sets += ["model.n_layer=2", "model.d_model=64", "model.seq_len=64"]
    cfg = load_config(str(REPO / "configs" / "demo.toml"), sets)
    engine = build_engine(cfg, groups, threads=args.threads)
    model = engine.model
    hvd = engine.update.sync.hvd
    rng = np.random.default_rng(comm.Get_rank())
    x = torch.from_numpy(rng.integers(0, cfg.model.vocab_size,
                                      (cfg.train.micro_batch_size, cfg.model.seq_len)))
    y = torch.roll(x, -1, dims=1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {"dp": dp, "threads": args.threads, "cores_allowed": len(os.sched_getaffinity(0)),
           "grad_bytes": sum(p.numel() * 4 for _, p in named), "buckets": {}}
    for kb in args.bucket_kb:
        sync = GradientSync(named, groups.dp, hvd, bucket_bytes=kb * 1024)
        seq, step, exposed, after, whole = [], [], [], [], []

        def timed_step(overlap: bool) -> None:
            sync.zero_grad()
            comm.Barrier()
            t0 = time.perf_counter()
            if overlap:
                with sync.sync():
                    model.loss(x, y).backward()
            else:
                model.loss(x, y).backward()
            t1 = time.perf_counter()
            sync.wait()
            t2 = time.perf_counter()
            # One host, one monotonic clock: the step's critical path runs from
            # the last rank's end of backward to the last rank's end of wait().
            ends = comm.allgather((t1, t2))
            last_bwd, last_end = max(e[0] for e in ends), max(e[1] for e in ends)
            if overlap:
                step.append(t2 - t0)
                exposed.append(last_end - last_bwd)
            else:
                seq.append(t2 - t0)
                after.append(last_end - last_bwd)

        for trial in range(args.trials):
            for overlap in ((True, False) if trial % 2 else (False, True)):
                timed_step(overlap)
            sync.zero_grad()
            model.loss(x, y).backward()
            comm.Barrier()
            t0 = time.perf_counter()
            sync.wait()  # nothing started in backward: every bucket goes now
            whole.append(time.perf_counter() - t0)
        sync.remove()

        def med(xs: list[float]) -> float:
            # The slowest rank's median sets the pace of a synchronous step.
            return max(comm.allgather(statistics.median(xs[2:]) * 1e3))

        out["buckets"][kb] = {"n_buckets": len(sync.buckets), "seq_ms": med(seq),
                              "step_ms": med(step), "exposed_ms": med(exposed),
                              "after_ms": med(after),
                              "whole_ms": med(whole)}
    if comm.Get_rank() == 0:
        print(json.dumps(out), flush=True)


# -- driver --------------------------------------------------------------------
def launch(dp: int, bind: str, args: argparse.Namespace) -> dict:
    exe = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    binding = "core:overload-allowed" if bind == "core" else "none"
    cmd = [exe, "-np", str(dp), "--oversubscribe", "--bind-to", binding, sys.executable,
           str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
           "--trials", str(args.trials), "--bucket-kb", ",".join(map(str, args.bucket_kb))]
    if args.quick:
        cmd.append("--quick")
    from dp_depth import env  # the sibling benchmark's launch environment

    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=900)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"dp={dp} bind={bind} failed:\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(lines[-1], object_hook=lambda d: {
        (int(k) if k.isdigit() else k): v for k, v in d.items()})


def int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}")
    if any(v < 1 for v in vals):
        raise SystemExit(f"{what}: values must be >= 1, got {text!r}")
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", default="2,4", help="data-parallel sizes (ranks on this host)")
    ap.add_argument("--bind", default="core,none", help="mpirun --bind-to settings: core, none")
    ap.add_argument("--bucket-kb", default="4096,1024",
                    help="GradientSync bucket sizes in KiB (4096 = the default)")
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads per rank")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="tiny model, few trials: a smoke test")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.bucket_kb = int_list(args.bucket_kb, "--bucket-kb")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.quick:
        args.trials = 4
        if args.bucket_kb == [4096, 1024]:
            args.bucket_kb = [4096, 128]  # the tiny model's 0.5 MB in more than one bucket
    if args.trials < 3:
        raise SystemExit(f"--trials must be >= 3 (2 are warm-up), got {args.trials}")
    if args.worker:
        run_worker(args)
        return
    dps = int_list(args.dp, "--dp")
    binds = args.bind.split(",")
    for b in binds:
        if b not in BINDS:
            raise SystemExit(f"--bind: {b!r} is not one of {', '.join(BINDS)}")
    rows = []
    for dp in dps:
        for bind in binds:
            r = launch(dp, bind, args)
            for kb, m in r["buckets"].items():
                rows.append((dp, bind, kb, r, m))
                print(f"dp={dp} bind={bind} bucket={kb} KiB ({m['n_buckets']} bucket(s)) "
                      f"cores/rank {r['cores_allowed']}: sequential {m['seq_ms']:.1f} ms, "
                      f"overlapped {m['step_ms']:.1f} ms, sync after backward "
                      f"{m['after_ms']:.2f} / {m['exposed_ms']:.2f} ms, "
                      f"whole sync {m['whole_ms']:.2f} ms", flush=True)
    print(f"\nOverlap of the gradient sync with backward, torch, demo model "
          f"({rows[0][3]['grad_bytes']:,} gradient bytes), {args.threads} thread(s)/rank, "
          f"{os.cpu_count()} cores")
    print("| dp | binding | bucket | buckets | whole sync ms | sync after backward: "
          "sequential ms | overlapped ms | hidden fraction | step ms: sequential | overlapped | "
          "overlapped vs sequential | vs default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {dp: m["step_ms"] for dp, bind, kb, _, m in rows
            if bind == binds[0] and kb == args.bucket_kb[0]}
    for dp, bind, kb, _, m in rows:
        hidden = 1 - m["exposed_ms"] / m["after_ms"]
        print(f"| {dp} | {bind} | {kb} KiB | {m['n_buckets']} | {m['whole_ms']:.2f} | "
              f"{m['after_ms']:.2f} | {m['exposed_ms']:.2f} | {hidden:.2f} | "
              f"{m['seq_ms']:.1f} | {m['step_ms']:.1f} | {m['step_ms'] / m['seq_ms']:.2f} | "
              f"{m['step_ms'] / base[dp]:.2f} |")


if __name__ == "__main__":
    main()
