"""Save checkpoints with CheckpointManager in one process, with a fault at a chosen point.

    python checkpoint_writer.py OUT MODE

MODE:
  ok            save steps 1 and 2 (keep 2);
  crash-commit  save step 1, then die (os._exit) after writing step 2's shard but
                before its manifest and rename;
  disk-full     save step 1, then save a step 2 larger than the file-size limit
                (RLIMIT_FSIZE), which fails with EFBIG like a full disk.
"""
import os
import resource
import signal
import sys

import numpy as np
from mpi4py import MPI

from hvdllm.common.errors import CheckpointError
from hvdllm.common.checkpoint_writer import CheckpointManager
from hvdllm.common.train_checkpoint import Piece, RankState

out, mode = sys.argv[1], sys.argv[2]
manager = CheckpointManager(out, MPI.COMM_SELF, keep=2, config={"model": {}},
                            topology={"dp": 1, "tp": 1, "pp": 1, "world": 1},
                            framework="torch", timeout_sec=30)


def state(step, n=1000):
    s = RankState()
    s.add(Piece("w", "param"), np.full(n, step, np.float32))
    s.shared.update(step=step, data={"consumed": step})
    return s


manager.save(1, state(1), blocking=True)
print("saved 1", flush=True)
if mode == "crash-commit":
    def die(*args, **kwargs):
        os._exit(9)  # the shard is on disk; the manifest and the rename never happen
    manager._commit = die
    manager.save(2, state(2))
    manager.wait()
elif mode == "disk-full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    try:
        manager.save(2, state(2, n=100000), blocking=True)
    except CheckpointError as exc:
        print(f"error: {exc}", flush=True)
        sys.exit(3)
else:
    manager.save(2, state(2), blocking=True)
    print("saved 2", flush=True)
manager.close()
