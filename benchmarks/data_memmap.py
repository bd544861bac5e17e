"""A corpus larger than memory: prepared once, trained on memory-mapped, at flat memory.

    python benchmarks/data_memmap.py [--gb 2.0] [--steps 60] [--workdir DIR] [--keep]

1. Writes a text corpus of ``--gb`` / 2 GB (the bundled corpus repeated,
   each copy numbered) and runs ``hvdllm prepare`` on it with the byte
   tokenizer and 2 workers: a token file of ``--gb`` GB (uint16 shards).
2. Trains the demo model (``configs/demo.toml``, torch, dp=2 under
   ``mpirun -np 2``) for ``--steps`` steps twice: on the prepared corpus, and
   on the bundled 0.5 MB corpus, the peer measured in the same run (the page
   cache is emptied first when run as root, as a later job would find it).  Every
   0.2 s it reads each rank's ``/proc/PID/status``: ``RssAnon`` (the rank's
   own memory), ``RssFile`` (file pages mapped, the page cache's and shared
   with other ranks) and ``VmRSS``.
3. Times the data path alone, in this process: the sampler's next step plus
   gathering its windows from the memory-mapped shards, for the demo's
   per-rank batch, against the demo step time of run 2's ``metrics.jsonl``.

Targets: per-rank ``RssAnon`` of the prepared run within 5% (+32 MB) of the
bundled run's, and not growing after the first logged step (flat); data
loading < 2% of a step.  Prints a table with the ratios; exits non-zero
only when a run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from dp_depth import env, mpirun  # noqa: E402  the launch environment of the other benchmarks


def write_corpus(path: Path, nbytes: int) -> None:
    from hvdllm.common.data import bundled_corpus_text

    base = bundled_corpus_text().encode()
    written, copy = 0, 0
    with open(path, "wb") as f:
        while written < nbytes:
            block = f"\n# copy {copy}\n".encode() + base
            block = block[:nbytes - written]
            f.write(block)
            written += len(block)
            copy += 1


def drop_page_cache() -> bool:
    """Empty the page cache (root only), so training finds the shards on disk as a later
    job would.  Just-written pages sit in the cache in large folios, and a rank touching
    one token maps the whole folio: RssFile then grows by megabytes a window."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def rank_pids(root_pid: int) -> list[int]:
    import psutil

    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    return sorted(p.pid for p in kids if "hvdllm" in " ".join(_cmdline(p)) and "train" in
                  _cmdline(p))


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:
        return []


def train(data_path: str, out: Path, steps: int) -> dict:
    """One 2-rank training run, sampling each rank's memory; its figures."""
    cmd = mpirun(2) + [sys.executable, "-m", "hvdllm", "train", "--config",
                       str(REPO / "configs" / "demo.toml"), "--set", "parallel.dp=2",
                       "--set", f"train.steps={steps}", "--set", "train.log_every=1",
                       "--set", "train.sample_tokens=0", "--set", "output.checkpoint=false",
                       "--set", f"data.path={json.dumps(data_path)}",
                       "--set", f"output.dir={json.dumps(str(out))}"]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    samples: dict[int, list[tuple[float, dict]]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid in rank_pids(proc.pid):
                st = status(pid)
                if st:
                    samples.setdefault(pid, []).append((time.time(), st))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = proc.communicate(timeout=1800)
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"training on {data_path or 'the bundled corpus'} failed "
                         f"(exit {proc.returncode})")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_log = (out / "metrics.jsonl").stat().st_mtime - metrics[-1]["elapsed_sec"] \
        + metrics[0]["elapsed_sec"]
    ranks = []
    for pid, rows in sorted(samples.items()):
        anon = [s["RssAnon"] for _, s in rows]
        after_first = [s["RssAnon"] for t, s in rows if t >= first_log] or anon[-1:]
        ranks.append({"pid": pid, "anon_peak": max(anon), "anon_at_first_step": after_first[0],
                      "anon_last": anon[-1], "file_peak": max(s["RssFile"] for _, s in rows),
                      "rss_peak": max(s["VmRSS"] for _, s in rows)})
    steps_timed = metrics[1:] or metrics
    step_sec = (metrics[-1]["elapsed_sec"] - metrics[0]["elapsed_sec"]) / max(len(steps_timed), 1)
    return {"ranks": ranks, "step_sec": step_sec, "loss": metrics[-1]["loss"]}


def loading_cost(prepared: Path, reps: int = 300) -> float:
    """Seconds per step of sampling + gathering one rank's demo batch from the shards."""
    import tomllib

    from hvdllm.common.data import ShardedBatchSampler, TokenWindows
    from hvdllm.common.shards import TokenShards

    cfg = tomllib.loads((REPO / "configs" / "demo.toml").read_text())
    seq = cfg.get("model", {}).get("seq_len", 64)
    gbs = cfg.get("train", {}).get("global_batch_size", 8)
    mbs = cfg.get("train", {}).get("micro_batch_size", 2)
    mbs = min(mbs, gbs // 2)
    windows = TokenWindows(TokenShards(prepared), seq)
    sampler = ShardedBatchSampler(len(windows), gbs, mbs, 0, 2, seed=1)
    for _ in range(20):
        [windows.batch(i) for i in sampler.next_step()]
    t0 = time.perf_counter()
    for _ in range(reps):
        [windows.batch(i) for i in sampler.next_step()]
    return (time.perf_counter() - t0) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the token file, GB")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and runs")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hvdllm-memmap-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        text, prepared = work / "corpus.txt", work / "prepared"
        nbytes = int(args.gb * 1e9 / 2)  # byte tokens are stored as uint16
        t0 = time.perf_counter()
        write_corpus(text, nbytes)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hvdllm", "prepare", str(text), "--tokenizer",
                        "bytes", "--out", str(prepared), "--workers", "2"],
                       env=env(), cwd=REPO, check=True)
        t_prepare = time.perf_counter() - t0
        token_bytes = sum(p.stat().st_size for p in prepared.glob("shard-*.bin"))
        dropped = drop_page_cache()
        big = train(str(prepared), work / "run_prepared", args.steps)
        small = train("", work / "run_bundled", args.steps)
        per_step = loading_cost(prepared)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    mb = 1 / 2**20
    print(f"\ncorpus text {nbytes / 1e9:.2f} GB written in {t_write:.0f}s; `hvdllm prepare` "
          f"(2 workers) {t_prepare:.0f}s; token shards {token_bytes / 1e9:.2f} GB; page cache "
          f"{'dropped before training' if dropped else 'NOT dropped (not root): RssFile is high'}")
    print("\n| run | rank | RssAnon at first step | RssAnon peak | RssAnon last | "
          "RssFile peak | VmRSS peak |")
    print("|---|---|---|---|---|---|---|")
    for name, res in (("prepared", big), ("bundled", small)):
        for i, r in enumerate(res["ranks"]):
            print(f"| {name} | {i} | {r['anon_at_first_step'] * mb:.0f} MB | "
                  f"{r['anon_peak'] * mb:.0f} MB | {r['anon_last'] * mb:.0f} MB | "
                  f"{r['file_peak'] * mb:.0f} MB | {r['rss_peak'] * mb:.0f} MB |")
    worst_extra = max(b["anon_peak"] - s["anon_peak"] for b, s in zip(big["ranks"],
                                                                      small["ranks"]))
    worst_growth = max(r["anon_last"] - r["anon_at_first_step"] for r in big["ranks"])
    base = max(s["anon_peak"] for s in small["ranks"])
    flat_ok = worst_extra <= 0.05 * base + 32 * 2**20 and worst_growth <= 32 * 2**20
    ratio = per_step / small["step_sec"]
    print(f"\nprepared - bundled RssAnon peak, worst rank: {worst_extra * mb:+.1f} MB "
          f"(bundled peak {base * mb:.0f} MB); growth after the first step: "
          f"{worst_growth * mb:+.1f} MB -> {'PASS' if flat_ok else 'MISS'}")
    print(f"data loading {per_step * 1e3:.3f} ms a step vs demo step "
          f"{small['step_sec'] * 1e3:.1f} ms: {ratio:.2%} (target < 2%) -> "
          f"{'PASS' if ratio < 0.02 else 'MISS'}")
    print(f"step time prepared / bundled: {big['step_sec'] / small['step_sec']:.3f}; "
          f"final loss {big['loss']:.4f} / {small['loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
