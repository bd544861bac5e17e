"""One side of ``tf_peer.py``: time whole training steps of one engine.

argv[1] is a JSON object: ``framework`` ("tensorflow" or "torch"), ``tp``,
``pp``, ``schedule``, ``micro`` (micro-batches per step), ``threads``, the
LLaMA model (``n_layer``, ``n_head``, ``d_model``, ``seq_len``,
``micro_batch``), ``warmup`` and ``steps``.  A one-process TensorFlow side
uses ``threads`` for both of TensorFlow's thread pools.  The engine is built as
``hvdllm train`` builds it, on as many ranks as the job has (tp x pp).
Rank 0 prints one JSON line with the median step time (seconds) of the
slowest rank, taken after a barrier each step.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

S = json.loads(sys.argv[1])


def main() -> None:
    import importlib

    import numpy as np

    from hvdllm.common.config import build_config
    from hvdllm.common.launch import world_comm
    from hvdllm.common.topology import Topology

    fw = S["framework"]
    comm = world_comm()
    cfg = build_config({}, [
        f"train.framework={fw}", "model.family=llama", f"model.n_layer={S['n_layer']}",
        f"model.n_head={S['n_head']}", f"model.d_model={S['d_model']}",
        f"model.seq_len={S['seq_len']}", f"parallel.tp={S['tp']}", f"parallel.pp={S['pp']}",
        f"parallel.schedule={S['schedule']}",
        f"train.global_batch_size={S['micro'] * S['micro_batch']}",
        f"train.micro_batch_size={S['micro_batch']}", "train.lr=1e-4"])
    dist = importlib.import_module(f"hvdllm.{fw}.distributed")
    engine_mod = importlib.import_module(f"hvdllm.{fw}.engine")
    groups = dist.init_groups(Topology(1, S["tp"], S["pp"]), comm, 600.0)
    if fw == "tensorflow" and comm.Get_size() == 1:
        # A one-process side is the "1 thread" peer: TensorFlow's inter-op pool
        # (2 in the engine, for in-graph collectives) would run two ops at once.
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(S["threads"])
        tf.config.threading.set_inter_op_parallelism_threads(S["threads"])
        engine_mod._set_threads = lambda threads: None
    engine = engine_mod.build_engine(cfg, groups, threads=S["threads"])
    rng = np.random.default_rng(0)
    micro = []
    for _ in range(S["micro"]):
        x = rng.integers(0, 256, (S["micro_batch"], S["seq_len"]), dtype=np.int64)
        micro.append((x, np.roll(x, -1, axis=1)))
    times = []
    for i in range(S["warmup"] + S["steps"]):
        comm.Barrier()
        start = time.perf_counter()
        engine.train_step(micro, 1e-4)
        comm.Barrier()
        if i >= S["warmup"]:
            times.append(time.perf_counter() - start)
    if comm.Get_rank() == 0:
        print(json.dumps({"median": statistics.median(times), "times": times}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
