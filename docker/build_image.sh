#!/usr/bin/env bash
# Build hvdllm's CPU or GPU image on this host.
#
#   bash docker/build_image.sh cpu [TAG]     (default TAG: hvdllm:cpu)
#   bash docker/build_image.sh gpu [TAG]     (default TAG: hvdllm:gpu)
#
# 1. docker/build_base.sh: a running Docker engine and a Debian bookworm base
#    (pulled, or made with debootstrap when no registry is reachable);
#    the GPU image instead takes CUDA_BASE_IMAGE (an nvidia/cuda devel image).
# 2. CPU image: docker/wheels/ gets the torch 2.13.0 wheel that pip resolves
#    on this host (the CPU build where pip is configured for it) and this
#    host's Horovod wheel cache, so the build neither pulls the CUDA torch nor
#    rebuilds Horovod when the cache key matches; and pip's CA bundle
#    (global.cert or PIP_CERT), for hosts behind a TLS-inspecting proxy.
# 3. docker build, with host networking (no bridge needed for pip).
set -euo pipefail
cd "$(dirname "$0")/.."

kind="${1:-cpu}"
case "$kind" in
  cpu|gpu) ;;
  *) echo "build_image.sh: kind must be cpu or gpu, not '$kind'" >&2; exit 2 ;;
esac
tag="${2:-hvdllm:$kind}"
log() { echo "[build_image] $*" >&2; }

if [ "$kind" = cpu ]; then
  base=$(bash docker/build_base.sh | tail -n1)
else
  bash docker/build_base.sh >/dev/null
  base="${CUDA_BASE_IMAGE:-nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04}"
fi

py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py=.venv/bin/python
cert=$("$py" -m pip config get global.cert 2>/dev/null || true)
cert="${PIP_CERT:-$cert}"
if [ -n "$cert" ] && [ -f "$cert" ]; then
  log "using pip's CA bundle for the build (docker/wheels/ca-bundle.crt)"
  cp "$cert" docker/wheels/ca-bundle.crt
fi
if [ "$kind" = cpu ]; then
  if ! ls docker/wheels/torch-2.13.0*.whl >/dev/null 2>&1; then
    log "fetching the torch 2.13.0 wheel pip resolves here into docker/wheels/"
    "$py" -m pip download --quiet --no-deps "torch==2.13.0" -d docker/wheels
  fi
  if ls docker/wheels/torch-2.13.0-*.whl >/dev/null 2>&1 && ! ls docker/wheels/torch-2.13.0+cpu*.whl >/dev/null 2>&1; then
    log "warning: docker/wheels holds a non-CPU torch wheel; pass --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu instead"
  fi
  cache="${HVDLLM_CACHE:-$HOME/.cache/hvdllm}"
  if [ -d "$cache" ]; then
    rm -rf docker/wheels/hvdllm-cache
    mkdir -p docker/wheels/hvdllm-cache
    cp -r "$cache"/. docker/wheels/hvdllm-cache/
  fi
fi

log "building $tag from $base"
DOCKER_BUILDKIT=0 docker build --network host -f "docker/Dockerfile.$kind" \
  --build-arg "BASE_IMAGE=$base" -t "$tag" .
echo "$tag"
