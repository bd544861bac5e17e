"""Parameter-server mode against synchronous DP, with and without a straggler.

    python benchmarks/ps_straggler.py [--steps 100] [--ps-steps 1.5] [--lr 3e-4]
                                      [--framework torch] [--conditions none,last,rotating]
                                      [--out DIR]

Four ranks of this machine (oversubscribed when it has fewer cores), one
small GPT, the same global batch and seed in every run:

* ``sync``: ``parallel.mode = "sync"``, dp = 4 on all four ranks;
* ``1+3 s=S`` and ``2+2 s=S``: 1 server and 3 worker replicas, or 2 and 2,
  with staleness S in 0, 1, 2, 4;
* ``1+3 s=S x`` (S = 2, 4): the same with ``parallel.ps_compensation =
  "extrapolate"`` (stale pulls moved on by the last update per missing step);

each as it is, with the last replica slowed 2x (``parallel.straggler =
"R:2"``: after each forward and backward it sleeps as long as they took),
and with one replica per step slowed 2x (``"*:2"``, a transient
straggler).  The sync run trains ``--steps`` steps, the others 1.5x as
many, so that a run slowed per step by stale gradients can still reach the
sync run's final loss.  For each
run: the wall time, the final loss (mean of the last 10 steps) and the wall
time at which the loss, averaged over 10 steps, first reaches the sync run's
final loss; the ratio of that to the sync run's wall time (target for
``1+3 s=2`` under the straggler: <= 0.75).  ``--out DIR`` keeps the runs and
writes ``DIR/ps_straggler.png``: loss against wall time and against samples.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.family=gpt", "model.n_layer=2", "model.d_model=64", "model.n_head=4",
         "model.seq_len=64", "train.global_batch_size=24", "train.micro_batch_size=2",
         "output.checkpoint=false", "train.log_every=1"]
SMOOTH = 10
#: straggler setting -> title: none, the last replica always, one replica per step
CONDITIONS = {"": "no straggler", "last": "last replica slowed 2x",
              "*": "one replica per step slowed 2x"}


from launch_common import mpirun, train_env  # noqa: E402  (benchmarks/)

_env = train_env
_mpirun = mpirun


def run(name: str, sets: list[str], steps: int, framework: str, out: Path) -> dict:
    work = out / name.replace(" ", "_").replace("=", "").replace("+", "p")
    if work.exists():
        shutil.rmtree(work)
    cmd = [_mpirun(), "-np", "4", "--oversubscribe", sys.executable, "-m", "hvdllm", "train"]
    for s in MODEL + sets + [f"train.steps={steps}", f"train.framework={framework}",
                             f"output.dir={work}"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "loss": [r["loss"] for r in records],
            "time": [r["elapsed_sec"] for r in records],
            "staleness_max": max((r.get("staleness_max", 0) for r in records), default=0)}


def _smoothed(loss: list[float]) -> list[float]:
    return [sum(loss[max(0, i - SMOOTH + 1):i + 1]) / (i + 1 - max(0, i - SMOOTH + 1))
            for i in range(len(loss))]


def time_to(run_: dict, target: float) -> float | None:
    for t, value in zip(run_["time"], _smoothed(run_["loss"])):
        if value <= target:
            return t
    return None


def plot(runs: list[dict], path: Path, batch: int, conditions: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(conditions), figsize=(6 * len(conditions), 8), sharey=True,
                             squeeze=False)
    for col, (slowed, title) in enumerate(conditions.items()):
        for r in runs:
            if r["slowed"] != slowed:
                continue
            samples = [batch * (i + 1) for i in range(len(r["loss"]))]
            axes[0][col].plot(r["time"], _smoothed(r["loss"]), label=r["name"])
            axes[1][col].plot(samples, _smoothed(r["loss"]), label=r["name"])
        axes[0][col].set_title(title)
        axes[0][col].set_xlabel("wall time (s)")
        axes[1][col].set_xlabel("samples")
        for row in (0, 1):
            axes[row][col].set_ylabel(f"loss ({SMOOTH}-step mean)")
            axes[row][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--framework", default="torch", choices=["torch", "tensorflow"])
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ps-steps", type=float, default=1.5,
                    help="parameter-server runs take this many times --steps, so that stale "
                         "runs can reach the sync run's final loss")
    ap.add_argument("--conditions", default="none,last,rotating",
                    help="comma-separated straggler conditions to run: none (no straggler), "
                         "last (the last replica always 2x), rotating (one replica per step)")
    ap.add_argument("--out", help="keep the runs here and write the plot")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ps-straggler-"))
    out.mkdir(parents=True, exist_ok=True)
    configs = [("sync", ["parallel.dp=4", f"train.lr={args.lr}"], 3)]
    for servers, workers in ((1, 3), (2, 2)):
        for s in (0, 1, 2, 4):
            configs.append((f"{servers}+{workers} s={s}",
                            [f"parallel.dp={workers}", "parallel.mode=ps", f"train.lr={args.lr}",
                             f"parallel.ps_servers={servers}", f"parallel.staleness={s}"],
                            workers - 1))
            if servers == 1 and s in (2, 4):
                configs.append((f"1+3 s={s} x", configs[-1][1]
                                + ["parallel.ps_compensation=extrapolate"], workers - 1))
    runs = []
    suffix = {"": "", "last": " slowed", "*": " rotating"}
    names = {"none": "", "last": "last", "rotating": "*"}
    unknown = [c for c in args.conditions.split(",") if c not in names]
    if unknown:
        ap.error(f"unknown condition(s) {', '.join(unknown)}; choose from none, last, rotating")
    conditions = {names[c]: CONDITIONS[names[c]] for c in args.conditions.split(",")}
    for slowed in conditions:
        for name, sets, last in configs:
            extra = []
            if slowed:
                extra = [f"parallel.straggler={last if slowed == 'last' else '*'}:2"]
            steps = args.steps if name == "sync" else round(args.steps * args.ps_steps)
            r = run(name + suffix[slowed], sets + extra, steps, args.framework, out)
            r["slowed"] = slowed
            r["base"] = name
            runs.append(r)
            print(f"{r['name']:<20} {steps:4d} steps, wall {r['time'][-1]:7.2f} s  final loss "
                  f"{sum(r['loss'][-SMOOTH:]) / SMOOTH:.4f}  max staleness "
                  f"{r['staleness_max']}", flush=True)
    print()
    for slowed, title in conditions.items():
        sync = next(r for r in runs if r["base"] == "sync" and r["slowed"] == slowed)
        target = sum(sync["loss"][-SMOOTH:]) / SMOOTH
        wall = sync["time"][-1]
        print(f"{title}: sync reaches {target:.4f} in {wall:.2f} s")
        for r in runs:
            if r["slowed"] != slowed or r["base"] == "sync":
                continue
            t = time_to(r, target)
            text = "never" if t is None else f"{t:7.2f} s = {t / wall:.2f} of sync"
            print(f"  {r['name']:<20} reaches it at {text}")
    if args.out:
        plot(runs, out / "ps_straggler.png", 24, conditions)
        (out / "ps_straggler.json").write_text(json.dumps(runs, indent=1))
        print(f"wrote {out / 'ps_straggler.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
