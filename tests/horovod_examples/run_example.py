"""Run one of Horovod's own TensorFlow 2 example programs through hvdllm's drop-ins.

Usage, one process per rank (``horovodrun -np 2 -H localhost:2 python ...``)::

    python run_example.py EXAMPLES_DIR NAME [program arguments ...]

``EXAMPLES_DIR`` is the ``examples`` directory of a Horovod v0.28.1 checkout
and ``NAME`` one of :data:`EDITS`' keys.  The runner

1. checks that ``EXAMPLES_DIR/tensorflow2/NAME`` is v0.28.1's file (SHA-256);
2. applies :data:`EDITS` [NAME]: the import line, and the edits every Keras 3
   user makes; each edit must match exactly once, and the resulting diff is
   checked to be those lines and nothing else (:func:`transform`);
3. runs the result as ``__main__`` with ``runpy``, ``sys.argv`` set to the
   program's path and arguments, in the current directory;
4. prints one line ``EXAMPLE-RESULT {json}`` per rank: rank, size, run time,
   a float64 sum and sum of squares of the model's trainable weights, whether
   every weight is finite, the ``History`` of the last ``fit`` call and the
   learning rate at the first and last batch of each epoch.

Around the program, never inside it:

* ``keras.Model.fit`` is wrapped: ``epochs`` and ``steps_per_epoch`` are
  capped by ``HVDLLM_EXAMPLE_MAX_EPOCHS`` / ``HVDLLM_EXAMPLE_MAX_STEPS``
  (unset: no cap), and one observing callback is appended last (it records,
  changes nothing);
* for ``tensorflow2_keras_mnist.py``, ``keras.datasets.mnist.load_data``
  returns synthetic arrays of MNIST's shapes and dtypes (no download), the
  same on every rank, whose labels can be learned;
* after the program, rank 0 of the MNIST example reloads its last
  ``checkpoint-{epoch}.h5`` and reports how far its weights are from the
  model's.
"""
from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple


class Edit(NamedTuple):
    """Replace ``old`` by ``new``: one textual substitution, and why it is allowed."""
    old: str
    new: str
    why: str


IMPORT_TF = Edit("import horovod.tensorflow as hvd", "import hvdllm.tensorflow as hvd",
                 "the import line")
IMPORT_KERAS = Edit("import horovod.tensorflow.keras as hvd",
                    "import hvdllm.tensorflow.keras as hvd", "the import line")
# Keras 3: Optimizer.variables is a property, no longer a method.
OPT_VARIABLES = Edit("opt.variables()", "opt.variables", "Keras 3: optimizer.variables is a property")
# Keras 3: compile() has no experimental_run_tf_function (Keras 3 raises on
# unknown arguments).  The ')' keeps the comment that names the argument out
# of the match; the call keeps its trailing comma, which Python allows.
NO_RUN_TF_FUNCTION = Edit("experimental_run_tf_function=False)", ")",
                          "Keras 3: compile() has no experimental_run_tf_function")

EDITS: dict[str, tuple[Edit, ...]] = {
    "tensorflow2_synthetic_benchmark.py": (IMPORT_TF, OPT_VARIABLES),
    "tensorflow2_keras_synthetic_benchmark.py": (IMPORT_KERAS, NO_RUN_TF_FUNCTION),
    "tensorflow2_keras_mnist.py": (IMPORT_KERAS, NO_RUN_TF_FUNCTION),
}

# SHA-256 of each program as tagged v0.28.1 in github.com/horovod/horovod.
SHA256 = {
    "tensorflow2_synthetic_benchmark.py":
        "f59fdc77495f955ed22198a84e7d1127721b85731bb466427974069222aceb95",
    "tensorflow2_keras_synthetic_benchmark.py":
        "01c441525291036ef7ce596bb9c3b4ca9faab96da94b52e8a97729b9d28705fd",
    "tensorflow2_keras_mnist.py":
        "c8b1ea114c102ee6ec4ec980c49bd330759c95f3b443555d07fa1a8233b0d8a4",
}

MNIST = "tensorflow2_keras_mnist.py"


def program_path(examples_dir: str | Path, name: str) -> Path:
    """The v0.28.1 program ``name`` under ``examples_dir``; one-line error otherwise."""
    if name not in EDITS:
        raise SystemExit(f"unknown example {name!r}; known: {', '.join(EDITS)}")
    path = Path(examples_dir) / "tensorflow2" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: give the examples/ directory of a Horovod v0.28.1 "
                         "checkout")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[name]:
        raise SystemExit(f"{path} is not Horovod v0.28.1's file (sha256 {digest})")
    return path


def changed_lines(original: str, edited: str) -> list[str]:
    """The ``-``/``+`` lines of a context-free unified diff."""
    return [line for line in difflib.unified_diff(original.splitlines(), edited.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def transform(source: str, edits: tuple[Edit, ...]) -> str:
    """Apply ``edits`` to ``source``; each must match once, on one line, and change only it."""
    edited = source
    expected = []
    for edit in edits:
        count = edited.count(edit.old)
        if count != 1:
            raise AssertionError(f"edit {edit.old!r} ({edit.why}) matches {count} times, not once")
        line = next(line for line in edited.splitlines() if edit.old in line)
        expected += [("-", line), ("+", line.replace(edit.old, edit.new))]
        edited = edited.replace(edit.old, edit.new)
    diff = changed_lines(source, edited)
    want = sorted(sign + line for sign, line in expected)
    if sorted(diff) != want or len(diff) != 2 * len(edits):
        raise AssertionError("the edits changed more than their lines:\n" + "\n".join(diff))
    return edited


def _synthetic_mnist(path: str = "mnist.npz"):
    """MNIST's shapes and dtypes (uint8 28x28 images, uint8 labels 0-9), learnable.

    Each image is low noise plus a bright 7x7 square placed by its label; the
    same arrays on every rank, as the real download would be.
    """
    import numpy as np

    def split(n: int, seed: int):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 64, size=(n, 28, 28)).astype(np.uint8)
        rows, cols = 2 + 12 * (labels // 5), 1 + 5 * (labels % 5)
        for dr in range(7):
            for dc in range(7):
                images[np.arange(n), rows + dr, cols + dc] = 255
        return images, labels

    return split(60000, 0), split(10000, 1)


class _Observer:
    """What the wrapped ``fit`` saw: the model, its History, the learning rate per epoch."""
    model = None
    history: dict = {}
    lr: list = []        # [epoch, lr at its first batch, lr at its last batch]
    fit_args: list = []  # [epochs, steps_per_epoch] as run, per call


def _patch_fit() -> None:
    import keras

    max_epochs = int(os.environ.get("HVDLLM_EXAMPLE_MAX_EPOCHS", "0")) or None
    max_steps = int(os.environ.get("HVDLLM_EXAMPLE_MAX_STEPS", "0")) or None
    original_fit = keras.Model.fit

    def lr_of(model) -> float:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.first = epoch, None

        def on_train_batch_begin(self, batch, logs=None):
            if self.first is None:
                self.first = lr_of(self.model)

        def on_epoch_end(self, epoch, logs=None):
            _Observer.lr.append([epoch, self.first, lr_of(self.model)])

    def fit(self, *args, **kwargs):
        if max_epochs and kwargs.get("epochs", 1) > max_epochs:
            kwargs["epochs"] = max_epochs
        steps = kwargs.get("steps_per_epoch")
        if max_steps and steps is not None and steps > max_steps:
            kwargs["steps_per_epoch"] = max_steps
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [Record()]
        _Observer.fit_args.append([kwargs.get("epochs", 1), kwargs.get("steps_per_epoch")])
        _Observer.model = self
        history = original_fit(self, *args, **kwargs)
        _Observer.history = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        return history

    keras.Model.fit = fit


def _checkpoint_report(model) -> dict:
    """Rank 0 of the MNIST example: its checkpoints, and the last one against the model."""
    import keras
    import numpy as np

    files = sorted(glob.glob("checkpoint-*.h5"), key=lambda f: int(f[11:-3]))
    report: dict = {"checkpoints": files}
    if files:
        loaded = keras.models.load_model(files[-1], compile=False)
        report["checkpoint_max_abs_diff"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(loaded.get_weights(), model.get_weights()))
    return report


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: run_example.py EXAMPLES_DIR NAME [program arguments ...]")
    path = program_path(argv[0], argv[1])
    name = path.name
    edited = transform(path.read_text(), EDITS[name])

    import numpy as np
    import keras

    _patch_fit()
    if name == MNIST:
        keras.datasets.mnist.load_data = _synthetic_mnist

    with tempfile.TemporaryDirectory(prefix="hvd-example-") as tmp:
        script = Path(tmp) / name
        script.write_text(edited)
        sys.argv = [str(path)] + argv[2:]
        start = time.perf_counter()
        module = runpy.run_path(str(script), run_name="__main__")
        seconds = time.perf_counter() - start

    hvd = module["hvd"]
    model = _Observer.model if _Observer.model is not None else module["model"]
    trainable = [np.asarray(w, dtype=np.float64) for w in model.trainable_weights]
    result = {
        "example": name,
        "rank": hvd.rank(),
        "size": hvd.size(),
        "seconds": round(seconds, 2),
        "weights_sum": float(sum(w.sum() for w in trainable)),
        "weights_sumsq": float(sum((w * w).sum() for w in trainable)),
        "finite": bool(all(np.isfinite(np.asarray(w)).all() for w in model.weights)),
        "history": _Observer.history,
        "lr": _Observer.lr,
        "fit_args": _Observer.fit_args,
    }
    if name == MNIST and hvd.rank() == 0:
        result.update(_checkpoint_report(model))
    print("EXAMPLE-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
