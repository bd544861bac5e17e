"""Train the tiny character-level model with a custom loop, data-parallel.

The model and data of train_single.py (an MLP that reads 8 bytes of
Python's documentation topics and predicts the next one), trained with a
``tf.function`` step around ``tf.GradientTape`` instead of ``model.fit``.
``hvdllm.tensorflow`` is the drop-in for ``horovod.tensorflow``:
``DistributedGradientTape`` averages the gradients over all ranks, and
``broadcast_variables`` after the first step makes every rank continue from
rank 0's weights and optimizer state (see README.md).
"""
import keras
import numpy as np
import tensorflow as tf
from pydoc_data.topics import topics
import hvdllm.tensorflow as hvd

CONTEXT, BATCH, STEPS = 8, 64, 600

text = "".join(topics[k] for k in sorted(topics))[:40_000].encode("utf-8")
hvd.init()
data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
data = np.array_split(data, hvd.size())[hvd.rank()]  # this rank's share of the text

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((CONTEXT,), dtype="int32"),
    keras.layers.Embedding(256, 16),     # (B, CONTEXT) -> (B, CONTEXT, 16)
    keras.layers.Flatten(),              # -> (B, CONTEXT * 16)
    keras.layers.Dense(128, activation="gelu"),
    keras.layers.Dense(256),             # logits over the next byte
])
optimizer = keras.optimizers.Adam(learning_rate=3e-3)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    tape = hvd.DistributedGradientTape(tape)  # gradient() averages over all ranks
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


rng = np.random.default_rng(hvd.rank())  # each rank draws its own batches
for step in range(STEPS):
    starts = rng.integers(0, len(data) - CONTEXT - 1, BATCH)
    x = data[starts[:, None] + np.arange(CONTEXT)]  # (BATCH, CONTEXT)
    y = data[starts + CONTEXT]
    loss = train_step(x, y)
    if step == 0:
        # The optimizer builds its state in the first step: broadcast after it.
        hvd.broadcast_variables(model.variables, root_rank=0)
        hvd.broadcast_variables(optimizer.variables, root_rank=0)
        print(f"first loss {float(loss):.4f}")

checksum = sum(float(np.sum(w, dtype=np.float64)) for w in model.get_weights())
print(f"final loss {float(loss):.4f} weights checksum {checksum:.10f}")
