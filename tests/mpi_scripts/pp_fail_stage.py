"""Run under mpirun -np 2 or 4: one stage raises in its forward; the whole job must end.

The last stage raises in its third forward of the second step, while the
other stages wait for its gradients.  The job must end non-zero within
seconds (not at the 600 s deadline), showing that stage's traceback.
"""
import time

from pp_common import micro_batches, rank, setup, size, stage_executor

groups = setup(timeout_sec=600.0)
model, executor = stage_executor(groups, "llama", size, "1f1b")
forwards = 0
run_block = model.run_block


def deliberately_failing_block(key, x):
    global forwards
    forwards += 1
    if forwards == 3 * len(executor.chunks[0].keys) + 1:
        print(f"raising at {time.time():.3f}", flush=True)
        raise ValueError(f"deliberate failure in the forward of stage {rank}")
    return run_block(key, x)


if rank == size - 1:
    executor.train_step(micro_batches(2 * size))  # a clean first step
    model.run_block = deliberately_failing_block
    executor.train_step(micro_batches(2 * size))
else:
    for _ in range(2):
        executor.train_step(micro_batches(2 * size))
raise AssertionError(f"stage {rank} finished a step that a failed stage took part in")
