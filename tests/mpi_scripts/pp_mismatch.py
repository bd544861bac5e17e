"""Run under mpirun -np 2: two stages that disagree about a message must fail, naming both.

Usage: pp_mismatch.py MODE.

* "dtype": stage 0 runs in float64, stage 1 in float32.  The stages find
  out while agreeing on message specs at set-up.
* "shape": both agree at set-up, but the step's micro-batches are shorter
  than agreed, so stage 0 sends activations of another shape than stage 1
  posted its receive for.

Either way the job must end non-zero (the failure handler aborts it) with
an error naming both stages and both specs, well before the deadline.
"""
import sys
import time

import torch

from pp_common import SEQ, micro_batches, rank, setup, stage_executor

mode = sys.argv[1]
groups = setup(timeout_sec=120.0)
dtype = torch.float64 if mode == "dtype" and rank == 0 else torch.float32
print(f"starting at {time.time():.3f}", flush=True)
model, executor = stage_executor(groups, "gpt", 2, "1f1b", dtype=dtype)
executor.train_step(micro_batches(2, seq=SEQ // 2 if mode == "shape" else SEQ))
raise AssertionError(f"stage {rank}: mode {mode} ran a step without an error")
