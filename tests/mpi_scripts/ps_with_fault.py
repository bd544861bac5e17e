"""Run ``hvdllm train`` in ps mode with one rank frozen (SIGSTOP) at a clock.

Usage: ps_with_fault.py ROLE RANK CLOCK -- <hvdllm train arguments>

ROLE ``worker``: world rank RANK freezes before it pushes the gradient of
CLOCK.  ROLE ``server``: world rank RANK freezes when it applies the update
of CLOCK.  The frozen rank prints ``fault on rank R at <unix time>`` first.
"""
import os
import signal
import sys
import time

from mpi4py import MPI

from hvdllm.common import param_server
from hvdllm.cli import main

role, fault_rank, fault_clock = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert sys.argv[4] == "--", sys.argv
rank = MPI.COMM_WORLD.Get_rank()


def freeze() -> None:
    print(f"fault on rank {rank} at {time.time():.3f}", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


if rank == fault_rank and role == "worker":
    real_push = param_server.ServerClient.push

    def push(self, clock, grad, loss):
        if clock == fault_clock:
            freeze()
        return real_push(self, clock, grad, loss)

    param_server.ServerClient.push = push
elif rank == fault_rank and role == "server":
    real_apply = param_server.ParameterServer._apply

    def _apply(self, sid, space):
        if space.version == fault_clock:
            freeze()
        return real_apply(self, sid, space)

    param_server.ParameterServer._apply = _apply

sys.exit(main(sys.argv[5:]))
