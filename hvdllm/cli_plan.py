"""``hvdllm plan`` and ``hvdllm timeline``: choose a layout before a run, see it after.

    hvdllm plan --config FILE [--set ...] --world N [--memory-per-rank GB]
                [--ranks-per-node K] [--hardware NAME | --calibration FILE] [--top N]
    hvdllm plan --calibrate [--config FILE] [--calibration FILE] [--ranks-per-node K]
                            [--no-trials]
    hvdllm timeline RUN_DIR [--out FILE.json]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

COMMANDS = ("plan", "timeline")
#: set for the ``mpirun`` that ``hvdllm plan --calibrate`` starts of itself
_CHILD_ENV = "HVDLLM_CALIBRATE_CHILD"


def default_calibration(framework: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hvdllm" / f"calibration-{framework}.json"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="rank the dp x tp x pp layouts of a config by predicted step time",
        description="Enumerate every layout of the config on --world ranks (dp x tp x pp, "
                    "schedule, virtual stages, micro-batch size, ZeRO-1, recompute, sequence "
                    "parallel), predict each one's peak memory per rank and step time, drop "
                    "those that do not fit and print the fastest, with the best as --set lines. "
                    "Rates come from `hvdllm plan --calibrate` (this machine) or --hardware.")
    plan.add_argument("--config", help="TOML config file (its model and batch are planned for)")
    plan.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    plan.add_argument("--world", type=int, metavar="N", help="ranks to plan for")
    plan.add_argument("--memory-per-rank", type=float, metavar="GB",
                      help="memory each rank may use (default: the hardware's)")
    plan.add_argument("--ranks-per-node", type=int, metavar="K",
                      help="ranks sharing a node (default: the hardware's)")
    plan.add_argument("--hardware", metavar="NAME",
                      help="a preset instead of the calibration: a100-80g or h100-80g")
    plan.add_argument("--calibration", metavar="FILE",
                      help="calibration file to read (or write with --calibrate); default "
                           "~/.cache/hvdllm/calibration-FRAMEWORK.json")
    plan.add_argument("--calibrate", action="store_true",
                      help="time a matmul, an allreduce and a send/recv here, train a small "
                           "model under 4 layouts for a few steps (see --no-trials) and save "
                           "the figures")
    plan.add_argument("--no-trials", action="store_true",
                      help="with --calibrate: skip the training trials (about a minute; they "
                           "fit the engines' compute, collective and pipeline figures)")
    plan.add_argument("--top", type=int, default=10, metavar="N",
                      help="rows of the table (default 10)")
    plan.add_argument("--json", metavar="FILE", help="also write every prediction as JSON")
    timeline = sub.add_parser(
        "timeline", help="merge a run's per-rank profiles into one Chrome/Perfetto trace",
        description="Read RUN_DIR/profile/rank-*.json (written with train.profile_steps) and "
                    "Horovod's timeline when one was recorded, align the ranks' clocks and "
                    "write one trace (one row per rank; open it in ui.perfetto.dev or "
                    "chrome://tracing); print per-rank compute, exposed communication, "
                    "bubble and idle time.")
    timeline.add_argument("run_dir", metavar="RUN_DIR", help="the run's output.dir")
    timeline.add_argument("--out", metavar="FILE.json",
                          help="trace to write (default RUN_DIR/timeline.json)")


def run(args: argparse.Namespace) -> int:
    if args.command == "plan":
        return _plan(args)
    from .common.timeline import merge_run

    summary = merge_run(args.run_dir, args.out)
    print(summary)
    return 0


def _mpi_size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _plan(args: argparse.Namespace) -> int:
    from .common import planner
    from .common.config import load_config
    from .common.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    framework = cfg.train.framework
    path = Path(args.calibration) if args.calibration else default_calibration(framework)
    if args.calibrate:
        return _calibrate(args, framework, path)
    if args.world is None:
        raise ConfigError("hvdllm plan needs --world N (or --calibrate)")
    if args.world < 1:
        raise ConfigError(f"--world must be >= 1, got {args.world}")
    memory = None
    if args.memory_per_rank is not None:
        if args.memory_per_rank <= 0:
            raise ConfigError(f"--memory-per-rank must be > 0 GB, got {args.memory_per_rank:g}")
        memory = args.memory_per_rank * planner.GB
    if args.hardware:
        if args.hardware not in planner.PRESETS:
            raise ConfigError(f"unknown --hardware {args.hardware!r}; choose one of: "
                              f"{', '.join(planner.PRESETS)}")
        hw = planner.PRESETS[args.hardware]
    else:
        hw = planner.load_hardware(path)
    if args.ranks_per_node is not None:
        if args.ranks_per_node < 1:
            raise ConfigError(f"--ranks-per-node must be >= 1, got {args.ranks_per_node}")
        hw = planner.replace(hw, ranks_per_node=args.ranks_per_node)
    result = planner.plan(cfg, args.world, hw, memory)
    print(planner.format_plan(result, args.top))
    if args.json:
        planner.save_plan_json(result, args.json)
    return 0


def _calibrate(args: argparse.Namespace, framework: str, path: Path) -> int:
    """Measure under MPI; a lone process starts ``mpirun -np 2`` of itself."""
    from .common import planner
    from .common.errors import EnvironmentSetupError

    if _mpi_size() < 2:
        here = Path(sys.executable).parent / "mpirun"
        mpirun = str(here) if here.exists() else shutil.which("mpirun")
        if mpirun is None:
            raise EnvironmentSetupError("hvdllm plan --calibrate needs mpirun on PATH "
                                        "(or run it under mpirun -np 2)")
        cmd = [mpirun, "-np", "2", "--oversubscribe", sys.executable, "-m", "hvdllm", "plan",
               "--calibrate", "--calibration", str(path), "--set", f"train.framework={framework}"]
        if args.ranks_per_node:
            cmd += ["--ranks-per-node", str(args.ranks_per_node)]
        if args.memory_per_rank:
            cmd += ["--memory-per-rank", str(args.memory_per_rank)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True, env={**os.environ, _CHILD_ENV: "1"})
        try:
            out, err = child.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise EnvironmentSetupError("hvdllm plan --calibrate: mpirun -np 2 did not finish "
                                        "in 600 s") from None
        proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EnvironmentSetupError(f"hvdllm plan --calibrate under mpirun -np 2 failed "
                                        f"(exit {proc.returncode}): {tail[0]}")
        sys.stdout.write(proc.stdout)
        if not args.no_trials:
            from .common.plan_trials import calibrate_with_trials

            hw, _ = calibrate_with_trials(framework, planner.load_hardware(path), mpirun)
            planner.save_hardware(hw, path)
            sp = hw.sp_collective_overhead or 0.0
            print(f"wrote {path}: trials fit compute x{hw.compute_factor:.2f}, pipeline "
                  f"x{hw.pipeline_factor:.2f}, tensor-parallel collective "
                  f"{hw.collective_overhead * 1e6:.0f} us ({sp * 1e6:.0f} us with sequence "
                  f"parallelism)")
        return 0
    from .common.launch import world_comm

    comm = world_comm()
    rpn = args.ranks_per_node or (os.cpu_count() or 1)
    total = planner.physical_memory()
    memory = args.memory_per_rank * planner.GB if args.memory_per_rank else total / rpn
    baseline = planner.framework_baseline(framework)
    hw = planner.calibrate(framework, comm, rpn, memory, baseline)
    if comm.Get_rank() == 0:
        planner.save_hardware(hw, path)
        best = max(r for _, r in hw.matmul)
        print(f"wrote {path}: matmul up to {best / 1e9:.1f} GFLOP/s, memory "
              f"{hw.mem_bw / 1e9:.1f} GB/s, op {hw.op_overhead * 1e6:.1f} us, allreduce "
              f"{hw.intra_bw / 1e9:.2f} GB/s + {hw.intra_latency * 1e6:.1f} us, send "
              f"{hw.p2p_bw / 1e9:.2f} GB/s + {hw.p2p_latency * 1e6:.1f} us, framework "
              f"{baseline / planner.GB:.2f} GB per rank")
        if _mpi_size() >= 2 and os.environ.get(_CHILD_ENV) != "1" and not args.no_trials:
            print("training trials skipped: they start their own mpirun; run "
                  "`hvdllm plan --calibrate` outside mpirun for them")
    return 0

