"""Run under mpirun/horovodrun: a Horovod-style script on ``hvdllm.torch`` whose rank 1 freezes.

Usage: dropin_hang.py TIMEOUT_SEC [env|arg]

``arg`` passes the deadline as ``hvd.init(timeout=...)``; ``env`` leaves it
to ``$HVDLLM_TIMEOUT_SEC``.  Rank 1 sends itself SIGSTOP at step 3; the
watchdog must end the job with a report naming it.
"""
import os
import signal
import sys
import time

import torch

import hvdllm.torch as hvd

timeout, how = float(sys.argv[1]), sys.argv[2]
hvd.init(timeout=timeout) if how == "arg" else hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(32, 32)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
for step in range(1, 1000):
    if hvd.rank() == 1 and step == 3:
        print(f"fault stop on rank 1 at {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    loss = model(torch.randn(8, 32)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"rank {hvd.rank()} finished without noticing", flush=True)
