"""Compression on a slow link: time to a target loss at dp=2 with a throttled DP link.

    python benchmarks/dp_bandwidth.py [--gbps 1,10] [--modes none,fp16,powersgd,topk]
        [--steps 300] [--target-loss X] [--set [MODE:]KEY=VALUE ...] [--quick]

On one machine the data-parallel "wire" is memory, so compression rarely
wins wall time.  This benchmark turns on the simulated link of
:mod:`hvdllm.common.link_throttle` (``HVDLLM_SIM_LINK_GBPS``): each step's
gradient exchange lasts at least ``comm_bytes / bandwidth``.  For each
bandwidth and each ``train.compression`` it trains the demo model
(``configs/demo.toml``) at dp=2 (``mpirun -np 2``) and reports the
wall-clock time (``elapsed_sec`` of ``metrics.jsonl``) at which the loss,
smoothed over the last 3 logged values, first reaches the target: by
default the smoothed loss "none" ends its run with at that bandwidth, or
``--target-loss``.  Ratios are against "none" at the same bandwidth,
measured in the same run of the script.

``--set KEY=VALUE`` adds a config override to every run;
``--set MODE:KEY=VALUE`` to that compression's runs only (e.g.
``--set powersgd:train.powersgd_rank=16``), so the tuned settings of each
compressor can be passed.  Prints a markdown table and writes a plot
(matplotlib, ``--plot``, default ``docs/images/dp_bandwidth.png``; a
temporary file with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from hvdllm.common.compression import COMPRESSIONS  # noqa: E402
from hvdllm.common.link_throttle import ENV_VAR, parse_gbps  # noqa: E402

import dp_depth  # noqa: E402  (the launch helpers of the sibling benchmark)

SMOOTH = 3  # logged losses averaged before comparing with the target


def env(gbps: float) -> dict[str, str]:
    """``dp_depth.py``'s launch environment, with the simulated link speed."""
    return dict(dp_depth.env(), **{ENV_VAR: repr(gbps)})


def mpirun(np_: int) -> list[str]:
    return dp_depth.mpirun(np_) + ["-x", ENV_VAR]


def parse_sets(items: list[str], modes: list[str]) -> dict[str, list[str]]:
    """``[MODE:]KEY=VALUE`` items as the overrides of each mode (one-line error if bad)."""
    out: dict[str, list[str]] = {m: [] for m in modes}
    for item in items:
        target, sep, rest = item.partition(":")
        if sep and "=" not in target:
            if target not in COMPRESSIONS:
                raise SystemExit(f"--set {item!r}: {target!r} is not a compression "
                                 f"({', '.join(COMPRESSIONS)})")
            which, kv = [target] if target in out else [], rest
        else:
            which, kv = list(out), item
        if "=" not in kv or not kv.split("=", 1)[0]:
            raise SystemExit(f"--set {item!r}: expected [MODE:]KEY=VALUE")
        for m in which:
            out[m].append(kv)
    return out


def train(mode: str, gbps: float, steps: int, out: Path, quick: bool,
          extra: list[str]) -> list[dict]:
    sets = ["parallel.dp=2", f"train.steps={steps}", f"train.compression={mode}",
            "train.sample_tokens=0", "train.log_every=10", f"output.dir={out}",
            "output.checkpoint=false"]
    if quick:
        sets += ["model.n_layer=2", "model.d_model=64", "model.seq_len=64", "train.log_every=2"]
    cmd = mpirun(2) + [sys.executable, "-m", "hvdllm", "train", "--config",
                       str(REPO / "configs" / "demo.toml")]
    for item in sets + extra:
        cmd += ["--set", item]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(gbps), timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{mode} at {gbps} Gb/s failed:\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def smoothed(recs: list[dict]) -> list[tuple[int, float, float]]:
    """(step, elapsed seconds, mean of the last SMOOTH losses) per logged record."""
    out = []
    for i, r in enumerate(recs):
        window = recs[max(0, i - SMOOTH + 1):i + 1]
        out.append((r["step"], r["elapsed_sec"], sum(w["loss"] for w in window) / len(window)))
    return out


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first smoothed loss <= target (after SMOOTH records), or None."""
    for step, sec, loss in curve[SMOOTH - 1:]:
        if loss <= target * (1 + 1e-9):
            return step, sec
    return None


def plot(results: dict, targets: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bws = list(results)
    fig, axes = plt.subplots(1, len(bws), figsize=(5.5 * len(bws), 4), squeeze=False)
    for ax, bw in zip(axes[0], bws):
        for mode, r in results[bw].items():
            xs = [c[1] for c in r["curve"]]
            ys = [c[2] for c in r["curve"]]
            ax.plot(xs, ys, label=mode)
        ax.axhline(targets[bw], color="grey", linestyle=":", label="target")
        ax.set_title(f"dp=2, simulated {bw:g} Gb/s link")
        ax.set_xlabel("wall-clock seconds")
        ax.set_ylabel(f"loss (mean of last {SMOOTH} logged)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gbps", default="1,10", help="simulated link speeds, Gb/s, comma-separated")
    ap.add_argument("--modes", default="none,fp16,powersgd,topk")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target-loss", type=float, default=None,
                    help="default: the loss 'none' ends its run with at each bandwidth")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    metavar="[MODE:]KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--plot", type=Path, default=None,
                    help="PNG to write (default docs/images/dp_bandwidth.png)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    args = ap.parse_args()
    try:
        bws = [parse_gbps(b) for b in args.gbps.split(",")]
    except Exception as exc:  # the one-line message of parse_gbps
        raise SystemExit(f"--gbps: {exc}")
    if any(b is None for b in bws):
        raise SystemExit(f"--gbps: expected comma-separated speeds, got {args.gbps!r}")
    modes = args.modes.split(",")
    for m in modes:
        if m not in COMPRESSIONS:
            raise SystemExit(f"--modes: {m!r} is not one of {', '.join(COMPRESSIONS)}")
    if args.target_loss is None and "none" not in modes:
        raise SystemExit("--modes must include 'none' unless --target-loss is given")
    if args.target_loss is not None and not args.target_loss > 0:
        raise SystemExit(f"--target-loss must be > 0, got {args.target_loss}")
    modes = (["none"] if "none" in modes else []) + [m for m in modes if m != "none"]
    extra = parse_sets(args.sets, modes)
    steps = 20 if args.quick else args.steps
    results: dict[float, dict[str, dict]] = {}
    targets: dict[float, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bw in bws:
            results[bw] = {}
            for mode in modes:
                recs = train(mode, bw, steps, Path(tmp) / f"{mode}_{bw:g}", args.quick,
                             extra[mode])
                curve = smoothed(recs)
                sec_per_step = ((recs[-1]["elapsed_sec"] - recs[0]["elapsed_sec"])
                                / max(1, recs[-1]["step"] - recs[0]["step"]))
                results[bw][mode] = {"curve": curve, "final": curve[-1][2],
                                     "comm_bytes": recs[-1].get("comm_bytes", 0),
                                     "sec_per_step": sec_per_step,
                                     "total_sec": recs[-1]["elapsed_sec"]}
                print(f"{bw:g} Gb/s {mode:<9} final loss {curve[-1][2]:.4f}  "
                      f"{sec_per_step * 1e3:.1f} ms/step  comm_bytes/step "
                      f"{results[bw][mode]['comm_bytes']:,}", flush=True)
            targets[bw] = (args.target_loss if args.target_loss is not None
                           else results[bw]["none"]["final"])
        plot_path = args.plot or (Path(tmp) / "dp_bandwidth.png" if args.quick
                                  else REPO / "docs" / "images" / "dp_bandwidth.png")
        plot(results, targets, plot_path)
        if args.quick and args.plot is None:
            print(f"\n(plot written and discarded with --quick: {plot_path.name})")
        else:
            print(f"\nplot: {plot_path}")
    for m in modes:
        if extra[m]:
            print(f"overrides for {m}: {' '.join(extra[m])}")
    print(f"\nTime to target loss, demo model, dp=2, {steps} steps, simulated DP link")
    print("| link | compression | bytes/step/rank | ms/step | step time vs none | final loss | "
          "target | reached at step | time to target | vs none |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bw in bws:
        base = results[bw].get("none")
        base_hit = time_to(base["curve"], targets[bw]) if base else None
        for mode, r in results[bw].items():
            hit = time_to(r["curve"], targets[bw])
            step_ratio = r["sec_per_step"] / base["sec_per_step"] if base else float("nan")
            if hit is None:
                when, secs, ratio = "not reached", f"> {r['total_sec']:.1f} s", "-"
            else:
                when, secs = str(hit[0]), f"{hit[1]:.1f} s"
                ratio = f"{hit[1] / base_hit[1]:.2f}" if base_hit else "-"
            print(f"| {bw:g} Gb/s | {mode} | {r['comm_bytes']:,} | {r['sec_per_step'] * 1e3:.1f} | "
                  f"{step_ratio:.2f} | {r['final']:.4f} | {targets[bw]:.4f} | {when} | {secs} | "
                  f"{ratio} |")


if __name__ == "__main__":
    main()
