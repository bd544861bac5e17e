#!/usr/bin/env bash
# Image entrypoint: runs the given command.  In the GPU image
# (HVDLLM_REQUIRE_GPU=1) it first checks that the container sees an NVIDIA GPU
# and, if not, says so in one line and exits 3, unless HVDLLM_ALLOW_CPU=1.
set -euo pipefail

if [ "${HVDLLM_REQUIRE_GPU:-0}" = 1 ]; then
  dev="${HVDLLM_DEV_DIR:-/dev}"
  if ! compgen -G "$dev/nvidia[0-9]*" >/dev/null; then
    if [ "${HVDLLM_ALLOW_CPU:-0}" = 1 ]; then
      echo "hvdllm: no NVIDIA GPU visible in this container; continuing on CPU (HVDLLM_ALLOW_CPU=1)" >&2
    else
      echo "hvdllm: no NVIDIA GPU visible in this container (run with --gpus all, or set HVDLLM_ALLOW_CPU=1 to run on CPU)" >&2
      exit 3
    fi
  fi
fi
if [ $# -eq 0 ]; then
  set -- hvdllm --help
fi
exec "$@"
