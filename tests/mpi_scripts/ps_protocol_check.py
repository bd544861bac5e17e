"""The parameter-server protocol on its own: one worker (rank 0), two servers.

Usage: ps_protocol_check.py none|extrapolate

The worker pushes clocks 0 and 1 without pulling (its clock-1 gradient is
stale), pulls version >= 2 for clock 4, then pushes clocks 2 and 3.  It
checks each pull against the same updates replayed here on one
:class:`ShardState`: "none" answers the parameters of version 2;
"extrapolate" answers them moved on by (4 - 2) times the last update.
Prints ``ok`` on the worker when everything matched.
"""
import sys

import numpy as np
from mpi4py import MPI

from hvdllm.common.param_server import OptimizerSpec, ParameterServer, ServerClient, ShardState

mode = sys.argv[1]
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
SIZE, CLOCKS, LR = 11, 4, 0.05
spec = OptimizerSpec("adamw", weight_decay=0.1)
rng = np.random.default_rng(7)
p0 = rng.standard_normal(SIZE).astype(np.float32)
decay = (np.arange(SIZE) % 3 != 0).astype(np.uint8)
grads = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(CLOCKS)]

if rank > 0:
    server = ParameterServer(comm, [0], lambda r: (0, 0), 1, 1, rank - 1, 2, CLOCKS,
                             lambda step: LR, spec, timeout=30.0,
                             extrapolate=mode == "extrapolate")
    server.receive_spaces()
    server.serve()
    # a checkpoint keeps the last update, which the next pulls extrapolate with
    assert ("delta" in server.state_of(0)) == (mode == "extrapolate")
    sys.exit(0)

replay = ShardState(p0.copy(), decay.astype(bool), spec)
versions = [p0.copy()]
for g in grads:
    replay.apply(g, LR)
    versions.append(replay.params.copy())

client = ServerClient(comm, [1, 2], space=0, replica=0, size=SIZE, timeout=30.0)
client.hello(p0, decay)
client.push(0, grads[0], 1.0)
client.push(1, grads[1], 1.0)
got = np.empty(SIZE, np.float32)
assert client.pull(2, got, clock=4) == 2
expect = versions[2]
if mode == "extrapolate":
    expect = versions[2] + np.float32(2) * (versions[2] - versions[1])
np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
assert not np.allclose(got, versions[2]) or mode == "none"
client.push(2, grads[2], 1.0)
client.push(3, grads[3], 1.0)
assert client.pull(4, got, clock=4) == 4  # up to date: no extrapolation
np.testing.assert_allclose(got, versions[4], rtol=1e-6, atol=1e-7)
client.bye()
print("ok", flush=True)
