"""Run under mpirun -np 2: a horovod.tensorflow-style loop on ``hvdllm.tensorflow``, rank 1 freezes.

Usage: tf_dropin_hang.py (the deadline comes from ``$HVDLLM_TIMEOUT_SEC``).
Rank 1 sends itself SIGSTOP at step 3; rank 0 then waits in the tape's
gradient reduction, and the watchdog must end the job with a report naming
rank 1.
"""
import os
import signal
import time

import keras
import tensorflow as tf

import hvdllm.tensorflow as hvd

hvd.init()
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16)])
optimizer = keras.optimizers.SGD(0.1)
hvd.broadcast_variables(model.variables, root_rank=0)
time.sleep(1.5)  # as any real job, run past the watchdog's first heartbeats
for step in range(1, 1000):
    if hvd.rank() == 1 and step == 3:
        print(f"fault stop on rank 1 at {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(tf.random.normal([8, 16]))))
    grads = hvd.DistributedGradientTape(tape).gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
print(f"rank {hvd.rank()} finished without noticing", flush=True)
