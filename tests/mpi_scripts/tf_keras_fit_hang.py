"""Run under mpirun -np 2: a Keras 3 ``fit`` on ``hvdllm.tensorflow.keras``, rank 1 freezes.

Usage: tf_keras_fit_hang.py (the deadline comes from ``$HVDLLM_TIMEOUT_SEC``).
Rank 1 sends itself SIGSTOP as its 3rd batch begins; rank 0 then waits in
the gradient reduction inside the traced train step, and the watchdog must
end the job with a report naming rank 1.
"""
import os
import signal
import time

import keras
import numpy as np

import hvdllm.tensorflow.keras as hvd


class FreezeRank1(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if hvd.rank() == 1 and batch == 2:
            print(f"fault stop on rank 1 at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)


hvd.init()
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16)])
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
time.sleep(1.5)  # as any real job, run past the watchdog's first heartbeats
x = np.random.default_rng(hvd.rank()).normal(size=(8000, 16)).astype(np.float32)
model.fit(x, x, batch_size=8, epochs=1, verbose=0, shuffle=False,
          callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), FreezeRank1()])
print(f"rank {hvd.rank()} finished without noticing", flush=True)
