"""Train a tiny character-level language model with Keras 3 ``model.fit``.

An MLP reads the previous 8 bytes of text and predicts the next one.  The
text is Python's own documentation topics, shipped with CPython
(``pydoc_data``), so nothing is downloaded.  train_single.py is a plain
one-process Keras script (TensorFlow backend); train_hvd.py is the same
script with eight lines added to make it data-parallel (see README.md).
"""
import keras
import numpy as np
from pydoc_data.topics import topics
import hvdllm.tensorflow.keras as hvd

CONTEXT, BATCH, EPOCHS = 8, 64, 4

text = "".join(topics[k] for k in sorted(topics))[:40_000].encode("utf-8")
hvd.init()
data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
share = len(data) // hvd.size()  # equal shares: every rank runs as many steps
data = data[hvd.rank() * share:(hvd.rank() + 1) * share]  # this rank's share of the text
x = np.lib.stride_tricks.sliding_window_view(data[:-1], CONTEXT)  # (N, CONTEXT)
y = data[CONTEXT:]                                                 # the byte after each window

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((CONTEXT,), dtype="int32"),
    keras.layers.Embedding(256, 16),     # (B, CONTEXT) -> (B, CONTEXT, 16)
    keras.layers.Flatten(),              # -> (B, CONTEXT * 16)
    keras.layers.Dense(128, activation="gelu"),
    keras.layers.Dense(256),             # logits over the next byte
])
optimizer = keras.optimizers.Adam(learning_rate=3e-3)
optimizer = hvd.DistributedOptimizer(optimizer)  # averages gradients over all ranks
model.compile(optimizer=optimizer,
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
callbacks = [keras.callbacks.TerminateOnNaN()]
callbacks.append(hvd.callbacks.BroadcastGlobalVariablesCallback(0))  # rank 0's weights
callbacks.append(hvd.callbacks.MetricAverageCallback())  # epoch losses averaged
verbose = 2                              # one line per epoch
verbose = verbose if hvd.rank() == 0 else 0  # progress from rank 0 only

history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, callbacks=callbacks,
                    verbose=verbose)
losses = history.history["loss"]         # mean loss of each epoch
print(f"first loss {losses[0]:.4f}")

checksum = sum(float(np.sum(w, dtype=np.float64)) for w in model.get_weights())
print(f"final loss {losses[-1]:.4f} weights checksum {checksum:.10f}")
