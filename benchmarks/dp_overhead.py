"""How much does hvdllm's data parallelism cost, next to plain, idiomatic peers?

Usage::

    python benchmarks/dp_overhead.py [--framework torch|tensorflow|both] [--trials N]
                                     [--quick] [--diagnose] [--json FILE] [--keep-logs]

For each framework it measures, in one run, each hvdllm figure against a peer:

1. **world-1 step**: hvdllm's engine (``build_engine`` on one rank) against a
   textbook loop on the same model class, batch and AdamW settings.
   Target: ratio <= 1.05.
2. **dp=2 gradient sync**: hvdllm's gradient averaging alone, under
   ``mpirun -np 2``, against one raw mpi4py ``Allreduce`` of a float32
   buffer with as many values as the model has parameters.  Target: <= 1.2
   (torch), <= 1.3 (TensorFlow).
3. **dp=2 step** (PyTorch only): hvdllm's ``train_step`` against
   ``DistributedDataParallel`` on gloo with ``no_sync()`` accumulation, same
   model, micro-batches and threads per rank.  Target: <= 0.97.

``--diagnose`` adds rows without a target, which help explain the misses
(see ``docs/benchmarks.md``): the sync against an in-place raw MPI
allreduce, and (torch) hvdllm's engine with its buckets sent through
Horovod (``WHAT_IF_ENV`` below) instead of in-place MPI.
``--quick`` runs a tiny model with few trials, as a smoke test.
``--scaling`` replaces the rows by the gradient sync alone against raw MPI
at 4 ranks (oversubscribed on a small machine) and for a model of about 50M
parameters at 2 ranks.

How the timing stays fair on a small, shared machine:

* Every side is its own process (world 1) or its own ``mpirun -np 2`` job
  (world 2), started here and driven over a local TCP socket by this script
  (see ``dp_overhead_worker.py``).  All of a framework's sides start together,
  run their untimed set-up steps, and then wait.
* The timed trials of the two sides of a comparison alternate (A B, B A,
  A B, ...), so a burst of load from other processes hits both sides alike.
  The first turns of each side are warm-up and are dropped; the figures
  are medians over the remaining trials.
* Two launches of the very same code can differ by a few percent (where
  their memory landed, how their threads were placed): as much as the
  world-1 target allows.  So each world-1 side runs in three launches,
  paired up, and hvdllm's dp=2 side in two (paired with the one peer job
  in turn); the samples of all launches are pooled.
* While one side runs, every other side is paused with SIGSTOP.  A paused
  process uses no CPU at all, which matters here: an idle Horovod job keeps
  its background thread polling its peers every cycle, and that would
  steal CPU from a peer running next to it.
* Multi-rank trials start after an MPI barrier; a trial's time is the
  slowest rank's.

The ratio is hvdllm's median divided by the peer's median; lower is better.
The "paired" column is the median of the per-trial ratios (each hvdllm trial
against the peer trial right next to it), a cross-check that is less
sensitive to load that drifts during the run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "dp_overhead_worker.py"

#: Model and training settings of a full run.  Compute dominates a step, but a
#: whole run (both frameworks) stays within a few minutes on 2 cores.
FULL = {"n_layer": 4, "d_model": 256, "n_head": 4, "seq_len": 128, "vocab_size": 256,
        "micro_batch": 8, "accum_world1": 1, "accum_world2": 2,
        "replicas_world1": 3, "replicas_world2": 2,
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
        "seed": 1234, "setup_steps": 2, "trials": 20, "warmup": 2, "sync_reps": 5}
#: A tiny model and few trials: a smoke test of the whole machinery.
QUICK = dict(FULL, n_layer=2, d_model=64, n_head=4, seq_len=64, micro_batch=4,
             replicas_world1=1, replicas_world2=1, setup_steps=1, trials=4, warmup=1,
             sync_reps=3)

#: Targets: the gradient sync against raw MPI of the same bytes, per framework
#: (TensorFlow's Horovod op cannot reduce in place), and the torch dp=2 step
#: against DistributedDataParallel.
SYNC_TARGET = {"torch": 1.2, "tensorflow": 1.3}
STEP_TARGET = 0.97

#: ``--scaling``: the gradient sync alone, against raw MPI, at 4 ranks (on a
#: machine with fewer cores, oversubscribed) and for a model of about 50M
#: parameters (201 MB of float32 gradients) at 2 ranks.
SCALING_WORLD = 4
LARGE = dict(FULL, n_layer=16, d_model=512, n_head=8, seq_len=64, micro_batch=1,
             setup_steps=1)

#: Environment of the torch "horovod transport" what-if rows of --diagnose:
#: the gradient buckets go through Horovod (its 1 ms cycle), as before hvdllm
#: summed host buckets with MPI directly.
WHAT_IF_ENV = {"HVDLLM_DP_TRANSPORT": "horovod"}

SETUP_TIMEOUT_SEC = 420.0
TURN_TIMEOUT_SEC = 180.0
EXIT_TIMEOUT_SEC = 30.0


class BenchError(RuntimeError):
    """A side failed or did not answer in time."""


@dataclass
class Connection:
    rank: int
    pid: int
    sock: socket.socket
    stream: Any

    def send(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def receive(self, timeout: float) -> dict[str, Any] | None:
        self.sock.settimeout(timeout)
        line = self.stream.readline()
        return json.loads(line) if line else None


@dataclass
class Job:
    """One side: a process (world 1) or an ``mpirun -np 2`` job (world 2).

    ``name`` identifies the job; ``side`` names what it runs (see
    ``dp_overhead_worker.py``); ``extra_env`` is added to its environment.
    """

    name: str
    side: str
    world: int
    settings: dict[str, Any]
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    conns: list[Connection] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, addr: str) -> None:
        cmd = [sys.executable, str(WORKER), self.side, json.dumps(self.settings)]
        if self.world > 1:
            cmd = [mpirun_path(), "-np", str(self.world), "--oversubscribe"] + cmd
        env = worker_env(addr)
        env["HVDLLM_BENCH_JOB"] = self.name
        env.update(self.extra_env)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO, start_new_session=True)
        log.close()

    @property
    def ready(self) -> bool:
        return len(self.conns) == self.world

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal_ranks(self, sig: int) -> None:
        for conn in self.conns:
            try:
                os.kill(conn.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        self._signal_ranks(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_ranks(signal.SIGCONT)

    def run(self, op: str, reps: int, args: dict[str, Any]) -> list[float]:
        """Run ``op`` ``reps`` times on every rank; per repetition, the slowest rank's time."""
        self.resume()
        try:
            for conn in self.conns:
                conn.send({"cmd": "run", "op": op, "reps": reps, "args": args})
            deadline = time.monotonic() + TURN_TIMEOUT_SEC
            per_rank = []
            for conn in self.conns:
                try:
                    reply = conn.receive(max(1.0, deadline - time.monotonic()))
                except socket.timeout:
                    raise BenchError(f"{self.name} rank {conn.rank}: no answer to {op!r} "
                                     f"within {TURN_TIMEOUT_SEC:g}s\n{self.log_tail()}") from None
                if reply is None or "error" in reply:
                    detail = reply["error"] if reply else self.log_tail()
                    raise BenchError(f"{self.name} rank {conn.rank} failed in {op!r}:\n{detail}")
                per_rank.append(reply["times"])
        finally:
            self.pause()
        return [max(times) for times in zip(*per_rank)]

    def stop(self) -> None:
        """Ask every rank to leave; kill the job if it does not within the deadline."""
        self.resume()
        for conn in self.conns:
            try:
                conn.send({"cmd": "exit"})
            except OSError:
                pass
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=EXIT_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            self._kill()
        for conn in self.conns:
            conn.sock.close()

    def _kill(self) -> None:
        assert self.proc is not None
        self.resume()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for kill in (lambda: os.killpg(self.proc.pid, signal.SIGKILL),
                     lambda: self._signal_ranks(signal.SIGKILL)):
            try:
                kill()
            except ProcessLookupError:
                pass
        self.proc.wait()


@dataclass
class Comparison:
    """hvdllm's op against a peer's op, with a target ratio.

    Each side may run in several identical jobs (replicas): the i-th hvdllm
    job is paired with the i-th peer job (a side with fewer jobs reuses
    them), and every turn runs every pair.  Replicas average out what
    differs from one launch to the next (see the module's docstring).
    """

    framework: str
    title: str
    hvdllm_jobs: list[Job]
    hvdllm_op: str
    peer_jobs: list[Job]
    peer_op: str
    peer_name: str
    target: float | None  # None: informational, no target
    reps: int = 1
    #: arguments of the peer's and hvdllm's op, sent to the sides
    args: dict[str, Any] = field(default_factory=dict)
    num_params: int = 0
    threads: dict[str, Any] = field(default_factory=dict)
    #: Horovod / Open MPI variables hvdllm's side ran with
    hvdllm_env: dict[str, str] = field(default_factory=dict)
    #: per side, the timed turns' lists of repetition times (seconds), pair by pair
    turns: dict[str, list[list[float]]] = field(default_factory=lambda: {"hvdllm": [], "peer": []})

    @property
    def pairs(self) -> list[tuple[Job, Job]]:
        """(hvdllm job, peer job) pairs; a side with fewer jobs reuses them in turn."""
        h, p = self.hvdllm_jobs, self.peer_jobs
        return [(h[i % len(h)], p[i % len(p)]) for i in range(max(len(h), len(p)))]

    def times(self, who: str) -> list[float]:
        return [t for turn in self.turns[who] for t in turn]

    def paired_ratio(self) -> float:
        """Median over turns of hvdllm's turn median / its paired peer turn's median.

        The two turns of a pair ran back to back, so this ratio cancels
        load that drifts on a scale of seconds even better than the ratio
        of the overall medians.
        """
        return statistics.median(statistics.median(h) / statistics.median(p)
                                 for h, p in zip(self.turns["hvdllm"], self.turns["peer"]))


def mpirun_path() -> str:
    """The ``mpirun`` next to this Python (the virtual environment's Open MPI), else PATH's."""
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        raise BenchError("mpirun not found next to this Python or on PATH; run `make setup`")
    return found


def worker_env(addr: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env["HVDLLM_BENCH_ADDR"] = addr
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def side_settings(preset: dict[str, Any], world: int) -> dict[str, Any]:
    out = {k: v for k, v in preset.items() if not k.startswith("accum_")}
    out["accum"] = preset[f"accum_world{world}"]
    return out


def plan_scaling(framework: str, preset: dict[str, Any],
                 log_dir: Path) -> tuple[list[Job], list[Comparison]]:
    """``--scaling``: hvdllm's sync against raw MPI at 4 ranks, and for a 50M model at 2."""
    fw = framework
    s4 = dict(side_settings(preset, 2), world=SCALING_WORLD)
    large = dict(side_settings(dict(LARGE, trials=preset["trials"]), 2), world=2)
    engine4 = Job(f"{fw}.engine{SCALING_WORLD}", f"{fw}.engine2", SCALING_WORLD, s4, log_dir)
    allreduce4 = Job(f"mpi_allreduce{SCALING_WORLD}", "mpi_allreduce", SCALING_WORLD, s4,
                     log_dir)
    engine_large = Job(f"{fw}.engine2.large", f"{fw}.engine2", 2, large, log_dir)
    allreduce2 = Job("mpi_allreduce", "mpi_allreduce", 2, large, log_dir)
    reps = preset["sync_reps"]
    comps = [
        Comparison(fw, f"dp={SCALING_WORLD} gradient sync", [engine4], "sync", [allreduce4],
                   "allreduce", "raw mpi4py Allreduce", SYNC_TARGET[fw], reps=reps),
        Comparison(fw, "dp=2 sync, 50M model", [engine_large], "sync", [allreduce2],
                   "allreduce", "raw mpi4py Allreduce", SYNC_TARGET[fw], reps=reps),
    ]
    return [engine4, allreduce4, engine_large, allreduce2], comps


def plan(framework: str, preset: dict[str, Any], log_dir: Path,
         diagnose: bool = False) -> tuple[list[Job], list[Comparison]]:
    """The jobs and comparisons of one framework; ``diagnose`` adds the what-if rows."""
    s1, s2 = side_settings(preset, 1), side_settings(preset, 2)
    fw = framework
    replicas = range(preset["replicas_world1"])
    engine1 = [Job(f"{fw}.engine1.{i}", f"{fw}.engine1", 1, s1, log_dir) for i in replicas]
    plain1 = [Job(f"{fw}.plain1.{i}", f"{fw}.plain1", 1, s1, log_dir) for i in replicas]
    engine2 = [Job(f"{fw}.engine2.{i}", f"{fw}.engine2", 2, s2, log_dir)
               for i in range(preset["replicas_world2"])]
    allreduce = Job("mpi_allreduce", "mpi_allreduce", 2, s2, log_dir)
    jobs = engine1 + plain1 + engine2 + [allreduce]
    plain_name = ("plain loop: backward/step/zero_grad" if fw == "torch"
                  else "plain loop: tf.function + GradientTape")
    sync_reps = preset["sync_reps"]
    comps = [
        Comparison(fw, "world-1 step", engine1, "step", plain1, "step", plain_name, 1.05),
        Comparison(fw, "dp=2 gradient sync", engine2, "sync", [allreduce], "allreduce",
                   "raw mpi4py Allreduce", SYNC_TARGET[fw], reps=sync_reps),
    ]
    if fw == "torch":
        ddp = Job("torch.ddp2", "torch.ddp2", 2, s2, log_dir)
        jobs.append(ddp)
        comps.append(Comparison(fw, "dp=2 step", engine2, "step", [ddp], "step",
                                "DistributedDataParallel (gloo), no_sync", STEP_TARGET))
    if diagnose:
        comps += [
            Comparison(fw, "sync vs in-place MPI", engine2, "sync", [allreduce],
                       "allreduce_inplace", "raw mpi4py Allreduce(IN_PLACE)", None,
                       reps=sync_reps),
        ]
        if fw == "torch":
            other = Job(f"{fw}.engine2.what_if", f"{fw}.engine2", 2, s2, log_dir,
                        extra_env=WHAT_IF_ENV)
            jobs.append(other)
            comps += [
                Comparison(fw, "what-if: horovod sync", [other], "sync", [allreduce],
                           "allreduce", "raw mpi4py Allreduce", None, reps=sync_reps),
                Comparison(fw, "what-if: horovod step", [other], "step", [ddp], "step",
                           "DistributedDataParallel (gloo), no_sync", None),
            ]
    return jobs, comps


def connect_all(server: socket.socket, jobs: list[Job]) -> None:
    """Accept every rank's hello; pause each job as soon as all its ranks are ready."""
    by_name = {job.name: job for job in jobs}
    deadline = time.monotonic() + SETUP_TIMEOUT_SEC
    server.settimeout(0.5)
    while not all(job.ready for job in jobs):
        for job in jobs:
            if not job.ready and job.proc is not None and job.proc.poll() is not None:
                raise BenchError(f"{job.name} exited with status {job.proc.returncode} during "
                                 f"set-up:\n{job.log_tail()}")
        if time.monotonic() > deadline:
            late = [job.name for job in jobs if not job.ready]
            raise BenchError(f"set-up of {', '.join(late)} took over {SETUP_TIMEOUT_SEC:g}s")
        try:
            sock, _ = server.accept()
        except socket.timeout:
            continue
        stream = sock.makefile("rw", encoding="utf-8", newline="\n")
        sock.settimeout(30.0)
        hello = json.loads(stream.readline())
        job = by_name[hello["hello"]]
        if "error" in hello:
            raise BenchError(f"{job.name} rank {hello['rank']} failed during set-up:\n"
                             f"{hello['error']}")
        job.conns.append(Connection(hello["rank"], hello["pid"], sock, stream))
        job.conns.sort(key=lambda c: c.rank)
        job.info.update(hello.get("info", {}))
        if job.ready:
            job.pause()


def run_framework(framework: str, preset: dict[str, Any], log_dir: Path, progress: bool,
                  diagnose: bool = False, scaling: bool = False) -> list[Comparison]:
    jobs, comps = (plan_scaling(framework, preset, log_dir) if scaling
                   else plan(framework, preset, log_dir, diagnose))
    server = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        for job in jobs:
            job.start(addr)
        t0 = time.monotonic()
        connect_all(server, jobs)
        if progress:
            print(f"  {framework}: every side set up in {time.monotonic() - t0:.0f}s; "
                  f"timing {preset['warmup']} warm-up + {preset['trials']} turns",
                  file=sys.stderr, flush=True)
        num_params = next(j.info["num_params"] for j in jobs if "num_params" in j.info)
        for comp in comps:
            comp.num_params = comp.hvdllm_jobs[0].info.get("num_params", num_params)
            comp.threads = {"hvdllm": comp.hvdllm_jobs[0].info.get("threads"),
                            "peer": comp.peer_jobs[0].info.get("threads")}
            comp.hvdllm_env = comp.hvdllm_jobs[0].info.get("env", {})
            if comp.peer_op.startswith("allreduce"):
                comp.args = {"count": comp.num_params}
        turns = preset["warmup"] + preset["trials"]
        for turn in range(turns):
            for index, comp in enumerate(comps):
                for pair, (hvdllm_job, peer_job) in enumerate(comp.pairs):
                    order = [("hvdllm", hvdllm_job, comp.hvdllm_op),
                             ("peer", peer_job, comp.peer_op)]
                    if (turn + index + pair) % 2:
                        order.reverse()
                    for who, job, op in order:
                        times = job.run(op, comp.reps, comp.args)
                        if turn >= preset["warmup"]:
                            comp.turns[who].append(times)
            if progress:
                print(f"  {framework}: turn {turn + 1}/{turns}", file=sys.stderr, flush=True)
    finally:
        for job in jobs:
            job.stop()
        server.close()
    return comps


def summarize(comp: Comparison) -> dict[str, Any]:
    h = statistics.median(comp.times("hvdllm"))
    p = statistics.median(comp.times("peer"))
    ratio = h / p
    out = {"framework": comp.framework, "measurement": comp.title, "peer": comp.peer_name,
           "hvdllm_ms": h * 1e3, "peer_ms": p * 1e3, "ratio": ratio,
           "paired_ratio": comp.paired_ratio(), "target": comp.target,
           "result": ("info" if comp.target is None
                      else "PASS" if ratio <= comp.target else "MISS"),
           "turns": len(comp.turns["hvdllm"]) // len(comp.pairs), "pairs": len(comp.pairs),
           "samples": len(comp.times("hvdllm")), "threads_per_rank": comp.threads,
           "hvdllm_env": comp.hvdllm_env,
           "hvdllm_times_ms": [t * 1e3 for t in comp.times("hvdllm")],
           "peer_times_ms": [t * 1e3 for t in comp.times("peer")]}
    if comp.peer_op.startswith("allreduce"):
        out["bytes"] = 4 * comp.num_params
    return out


def spread(times_ms: list[float]) -> str:
    """Half the inter-quartile range, in % of the median."""
    if len(times_ms) < 4:
        return ""
    q1, _, q3 = statistics.quantiles(times_ms, n=4)
    return f"{50 * (q3 - q1) / statistics.median(times_ms):.0f}%"


def print_table(rows: list[dict[str, Any]], preset: dict[str, Any], num_params: dict,
                engine_env: dict[str, dict[str, str]], load: tuple[float, float]) -> None:
    p = preset
    print()
    print(f"hvdllm data-parallel overhead: {os.cpu_count()} CPU cores ({platform.machine()}), "
          f"CPU only; 1-minute load average {load[0]:.1f} before the run, {load[1]:.1f} after "
          f"(the latter includes this benchmark's own processes)")
    print(f"model: GPT n_layer={p['n_layer']} d_model={p['d_model']} n_head={p['n_head']} "
          f"seq_len={p['seq_len']} vocab={p['vocab_size']} ("
          + ", ".join(f"{fw} {n:,} parameters" for fw, n in num_params.items()) + ")")
    if any("50M" in r["measurement"] for r in rows):
        print(f"the 50M row's model: GPT n_layer={LARGE['n_layer']} d_model={LARGE['d_model']} "
              f"n_head={LARGE['n_head']} seq_len={LARGE['seq_len']}, micro-batch "
              f"{LARGE['micro_batch']}; the dp={SCALING_WORLD} row runs {SCALING_WORLD} ranks "
              f"on {os.cpu_count()} cores")
    print(f"batch: micro-batch {p['micro_batch']} sequences; {p['accum_world1']} micro-batch(es) "
          f"per step at world 1, {p['accum_world2']} per rank per step at dp=2")
    knobs = {k: v for k, v in os.environ.items() if k.startswith(("HOROVOD_", "OMPI_MCA_"))}
    print("Horovod / MPI variables set for the run: "
          + (", ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "none"))
    print("hvdllm's engines ran with: " + "; ".join(
        f"{fw} " + (", ".join(f"{k}={v}" for k, v in env.items()) or "library defaults")
        for fw, env in engine_env.items()))
    print()
    head = (f"{'framework':<11}{'measurement':<24}{'threads':>7}{'n':>5}{'hvdllm':>11}{'IQR':>6}"
            f"{'peer':>11}{'IQR':>6}{'ratio':>8}{'paired':>8}{'target':>8}  result")
    print(head)
    print("-" * len(head))
    for r in rows:
        th = r["threads_per_rank"]
        threads = str(th["hvdllm"]) if th["hvdllm"] == th["peer"] or th["peer"] is None \
            else f"{th['hvdllm']}/{th['peer']}"
        print(f"{r['framework']:<11}{r['measurement']:<24}{threads:>7}{r['samples']:>5}"
              f"{r['hvdllm_ms']:>8.2f} ms{spread(r['hvdllm_times_ms']):>6}"
              f"{r['peer_ms']:>8.2f} ms{spread(r['peer_times_ms']):>6}"
              f"{r['ratio']:>8.3f}{r['paired_ratio']:>8.3f}"
              f"{'<=' + format(r['target'], '.2f') if r['target'] else '-':>8}"
              f"  {r['result']}")
    print()
    print("peers:")
    for r in rows:
        extra = (f" of {r['bytes'] / 1e6:.2f} MB ({r['bytes'] // 4:,} float32)"
                 if "bytes" in r else "")
        print(f"  {r['framework']} {r['measurement']}: {r['peer']}{extra}")
    if any(r["result"] == "info" for r in rows):
        print("what-if rows (--diagnose; not hvdllm as it stands, no target):")
        print("  horovod: hvdllm's torch engine run with " + " ".join(
            f"{k}={v}" for k, v in WHAT_IF_ENV.items()) + " (its buckets through Horovod)")
    print(f"times: medians of n timed samples per side: {p['trials']} turns after "
          f"{p['warmup']} warm-up turns; a turn times each side once, alternating which goes "
          f"first, in each pair of processes ({p['replicas_world1']} launches of each side at "
          f"world 1, {p['replicas_world2']} of hvdllm's at dp=2), {p['sync_reps']} times in a "
          f"row for a sync")
    print("IQR = half the inter-quartile range in % of the median; ratio = hvdllm median / "
          "peer median; paired = median of the per-turn ratios; threads = intra-op threads "
          "per rank")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", choices=("torch", "tensorflow", "both"), default="both")
    ap.add_argument("--trials", type=int, default=None,
                    help="timed turns per comparison (default 20; --quick: 4)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model and few trials: a smoke test in well under a minute")
    ap.add_argument("--diagnose", action="store_true",
                    help="add what-if rows (no target) that size the fixes of the misses")
    ap.add_argument("--scaling", action="store_true",
                    help=f"instead of the usual rows: the gradient sync against raw MPI at "
                         f"dp={SCALING_WORLD} and for a ~50M-parameter model at dp=2")
    ap.add_argument("--json", metavar="FILE", help="also write every result (all trials) here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the sides' logs and say where")
    args = ap.parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    if args.trials is not None:
        if args.trials < 1:
            ap.error("--trials must be at least 1")
        preset["trials"] = args.trials
    frameworks = ["torch", "tensorflow"] if args.framework == "both" else [args.framework]

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"dp_overhead: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    log_dir = Path(tempfile.mkdtemp(prefix="hvdllm-bench-"))
    start = time.monotonic()
    load_before = os.getloadavg()[0]
    rows, num_params, engine_env = [], {}, {}
    try:
        for fw in frameworks:
            comps = run_framework(fw, preset, log_dir, progress=True, diagnose=args.diagnose,
                                  scaling=args.scaling)
            num_params[fw] = comps[0].num_params
            engine_env[fw] = comps[-1 if args.scaling else 1].hvdllm_env  # a dp > 1 engine
            rows.extend(summarize(c) for c in comps)
    except BenchError as exc:
        print(f"dp_overhead: error: {exc}", file=sys.stderr)
        print(f"dp_overhead: side logs in {log_dir}", file=sys.stderr)
        return 1
    load = (load_before, os.getloadavg()[0])
    print_table(rows, preset, num_params, engine_env, load)
    print(f"total time {time.monotonic() - start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"settings": preset, "cpu_count": os.cpu_count(), "load_average": load,
             "horovod_mpi_env": {k: v for k, v in os.environ.items()
                                 if k.startswith(("HOROVOD_", "OMPI_MCA_"))},
             "results": rows}, indent=1))
    if args.keep_logs:
        print(f"side logs in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
