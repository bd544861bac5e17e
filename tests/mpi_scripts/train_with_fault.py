"""Run ``hvdllm train`` with a fault injected on one rank (under mpirun or horovodrun).

Usage: train_with_fault.py FAULT RANK STEP -- <hvdllm train arguments>

FAULT is applied on global rank RANK when its optimizer step STEP begins:

* ``stop``: the process sends itself SIGSTOP (frozen, as by ``kill -STOP``);
* ``busy``: a pure-Python busy loop forever (alive, never communicating);
* ``slow``: from that step on, every step of the rank takes three times as
  long (it sleeps twice its step time, and at least one second, after it).

The faulty rank prints ``fault <FAULT> on rank R at <unix time>`` first.
"""
import os
import signal
import sys
import time

from mpi4py import MPI

import hvdllm.train.runner as runner
from hvdllm.cli import main

fault, fault_rank, fault_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert sys.argv[4] == "--", sys.argv
rank = MPI.COMM_WORLD.Get_rank()
real_run_training = runner.run_training


def with_fault(cfg, engine, *args, **kwargs):
    real_step = engine.train_step
    count = 0

    def train_step(micro_batches, lr):
        nonlocal count
        count += 1
        if rank == fault_rank and count == fault_step:
            print(f"fault {fault} on rank {rank} at {time.time():.3f}", flush=True)
            if fault == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif fault == "busy":
                spin = 0
                while True:
                    spin += 1
        if rank == fault_rank and fault == "slow" and count >= fault_step:
            start = time.perf_counter()
            loss = real_step(micro_batches, lr)
            time.sleep(max(2 * (time.perf_counter() - start), 1.0))
            return loss
        return real_step(micro_batches, lr)

    engine.train_step = train_step
    return real_run_training(cfg, engine, *args, **kwargs)


runner.run_training = with_fault
sys.exit(main(sys.argv[5:]))
