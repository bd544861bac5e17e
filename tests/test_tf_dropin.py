"""The drop-in ``hvdllm.tensorflow`` wrapper for ``horovod.tensorflow`` scripts.

* importing hvdllm.tensorflow imports neither TensorFlow nor Horovod, and
  serves every public name of horovod.tensorflow;
* at 2 ranks (tests/mpi_scripts/tf_dropin_check.py): the raw collectives,
  ``broadcast_variables`` of Keras 3 model and optimizer variables, a
  ``tf.function`` loop with ``DistributedGradientTape`` equal to one process
  (SGD, Adam; 1e-5), each compression, op and option, and one-line errors
  (before ``init()``, and for what a path cannot do);
* a frozen rank ends the job within the deadline, with a report naming it,
  in an eager ``DistributedGradientTape`` loop and inside Keras ``fit``'s
  traced step;
* ``hvdllm.tensorflow.keras`` serves every public name of
  horovod.tensorflow.keras and its callbacks, and at 2 ranks
  (tests/mpi_scripts/tf_keras_dropin_check.py) Keras 3 ``fit`` with
  ``DistributedOptimizer`` equals one process (SGD, Adam; 1e-5),
  ``backward_passes_per_step=4`` equals a 4x batch with its communication
  only in the 4th pass's branch, each callback has its effect, and bad input
  (including shapes that differ across ranks) gets one-line errors.
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, base_env, mpirun_prefix, run, run_ok

SCRIPTS = Path(__file__).parent / "mpi_scripts"


def python(code: str, timeout: float = 120) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=base_env(), cwd=REPO, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_importing_hvdllm_tensorflow_imports_no_framework():
    out = python("""
import sys
import hvdllm.tensorflow as hvd, hvdllm.tensorflow.capabilities
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "horovod"))
assert not heavy, heavy
assert "DistributedGradientTape" in dir(hvd) and "init" in dir(hvd)
try:
    hvd.no_such_name
except AttributeError:
    print("attribute error")
sys.modules["horovod"] = None  # as if Horovod were not installed
from hvdllm.common.errors import EnvironmentSetupError
try:
    hvd.init
except EnvironmentSetupError as exc:
    print("clean error:", exc)
""")
    assert "attribute error" in out
    assert "clean error: Horovod with TensorFlow support is not available" in out, out


def test_serves_every_public_name_of_horovod_tensorflow():
    out = python("""
import types
import horovod.tensorflow as horovod_tf
import hvdllm.tensorflow as hvd
internal = {"check_extension", "handle_average_backwards_compatibility", "refs_to_vars",
            "vars_to_refs", "split_list"}
public = {n for n in dir(horovod_tf) if not n.startswith("_") and n not in internal
          and not isinstance(getattr(horovod_tf, n), types.ModuleType)}
missing = sorted(public - hvd.HOROVOD_API)
assert not missing, missing
for name in sorted(hvd.HOROVOD_API):
    getattr(hvd, name)
print("served", len(hvd.HOROVOD_API))
""")
    assert "served" in out


@pytest.mark.multirank
def test_dropin_at_two_ranks():
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "tf_dropin_check.py")],
                 timeout=240)
    assert res.stdout.count("tf drop-in check passed") == 2, res.stdout[-2000:]


@pytest.mark.multirank
@pytest.mark.parametrize("script, wait", [
    ("tf_dropin_hang.py", "DistributedGradientTape gradient reduction"),  # eager tape loop
    ("tf_keras_fit_hang.py", "DistributedOptimizer gradient reduction"),  # inside fit's graph
])
def test_frozen_rank_is_reported(tmp_path, script, wait):
    timeout = 10
    env = base_env()
    env["HVDLLM_HANG_DIR"] = str(tmp_path)
    env["HVDLLM_TIMEOUT_SEC"] = str(timeout)
    res = run(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / script)], timeout=180, env=env)
    ended = time.time()
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "finished without noticing" not in out, out[-3000:]
    fault = float(re.search(r"fault stop on rank 1 at ([0-9.]+)", out).group(1))
    assert ended - fault < timeout + 15, (ended - fault, out[-3000:])
    head = next(line for line in out.splitlines() if "[hvdllm] HANG:" in line)
    assert "likeliest culprit rank 1 (no heartbeat" in head, head
    assert wait in out and "at step 3" in out, out[-3000:]
    record = json.loads((tmp_path / "hang-rank-0.json").read_text())
    assert record["culprit"]["rank"] == 1 and record["not_arrived"] == [1]


def test_keras_serves_every_public_name_of_horovod_tensorflow_keras():
    out = python("""
import types
import horovod.tensorflow.keras as horovod_keras
import horovod.tensorflow.keras.callbacks as horovod_callbacks
import hvdllm.tensorflow.keras as hvd
public = {n for n in dir(horovod_keras) if not n.startswith("_")
          and not isinstance(getattr(horovod_keras, n), types.ModuleType)}
missing = sorted(n for n in public if not hasattr(hvd, n))
assert not missing, missing
callbacks = {n for n in dir(horovod_callbacks) if n.endswith("Callback") or n.endswith("Checkpoint")}
missing = sorted(n for n in callbacks if not hasattr(hvd.callbacks, n))
assert callbacks and not missing, missing
print("served", len(public), len(callbacks))
""")
    assert "served" in out


@pytest.mark.multirank
def test_keras_dropin_at_two_ranks():
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "tf_keras_dropin_check.py")],
                 timeout=300)
    assert res.stdout.count("tf keras drop-in check passed") == 2, res.stdout[-2000:]
    assert "finished gradual learning rate warmup to 0.04" in res.stdout
