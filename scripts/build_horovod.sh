#!/usr/bin/env bash
# Build (or fetch from the local cache) a Horovod 0.28.1 wheel that works with
# the torch and TensorFlow installed in the active Python environment, and
# install it.
#
# Horovod 0.28.1 is the last release and its sdist no longer builds against
# torch >= 2.1 or recent TensorFlow.  Two CMake edits fix that:
#   * horovod/torch/CMakeLists.txt: C++17 instead of C++14 (torch headers
#     need it), and link the C++17 flavour of gloo (compatible17_gloo).
#   * horovod/tensorflow/CMakeLists.txt: drop xla_mpi_ops.cc, which needs
#     highwayhash headers that TensorFlow wheels do not ship.
#
# The wheel is cached under $HVDLLM_CACHE (default ~/.cache/hvdllm), keyed by
# the Horovod, Python, torch, TensorFlow and MPI versions, so each machine
# builds it once.
set -euo pipefail

HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
PY="${PYTHON:-python}"
CACHE_ROOT="${HVDLLM_CACHE:-$HOME/.cache/hvdllm}"

key=$("$PY" - <<'PY'
import sys, re
def v(mod):
    try:
        m = __import__(mod)
        return m.__version__
    except Exception:
        return "none"
from mpi4py import MPI
lib = MPI.Get_library_version().split(",")[0].strip()
lib = re.sub(r"[^A-Za-z0-9.]+", "", lib)
print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{v('torch')}-tf{v('tensorflow')}-{lib}")
PY
)
here="$(cd "$(dirname "$0")" && pwd)"
patch_level=$("$PY" "$here/patch_horovod.py" --level)
key="${key//+/_}-patch$patch_level"
cache_dir="$CACHE_ROOT/horovod-$HOROVOD_VERSION/$key"

# The installed copy records the key it was built for.
marker=$("$PY" -c "import importlib.util as u, os; s = u.find_spec('horovod'); print(os.path.join(os.path.dirname(s.origin), 'HVDLLM_BUILD_KEY') if s else '')" 2>/dev/null || true)
if [ -n "$marker" ] && [ "$(cat "$marker" 2>/dev/null)" = "$key" ] \
   && "$PY" -c "import horovod.torch, horovod.tensorflow" 2>/dev/null; then
  echo "[hvdllm] horovod $HOROVOD_VERSION ($key) already installed"
  exit 0
fi

wheel=$(ls "$cache_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "[hvdllm] building horovod $HOROVOD_VERSION for $key (about 5 minutes on 2 cores)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  "$PY" "$here/patch_horovod.py" "$src"
  mkdir -p "$cache_dir"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1 \
  MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
  cp "$work"/dist/horovod-*.whl "$cache_dir/"
  wheel=$(ls "$cache_dir"/horovod-*.whl | head -n1)
fi
echo "[hvdllm] installing $wheel"
"$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$PY" -c "import horovod, os; open(os.path.join(os.path.dirname(horovod.__file__), 'HVDLLM_BUILD_KEY'), 'w').write('$key')"
# Runtime deps of horovodrun, without letting pip touch torch or tensorflow.
"$PY" -m pip install --quiet cffi cloudpickle psutil pyyaml packaging
