#!/usr/bin/env bash
# Make sure a Docker engine is running and a Debian bookworm base image exists.
#
#   bash docker/build_base.sh [TAG]        (default TAG: hvdllm-base:bookworm)
#
# Prints the base image name on its last line.  When a registry is reachable,
# debian:bookworm-slim is pulled and tagged as TAG; otherwise the base is made
# with debootstrap from Debian's package archive and `docker import`.
# Needs root for apt-get, dockerd and debootstrap when those are missing.
#
# Environment:
#   HVDLLM_BASE_FROM   "auto" (default), "pull" or "debootstrap"
#   DEBIAN_MIRROR      archive for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

TAG="${1:-hvdllm-base:bookworm}"
FROM="${HVDLLM_BASE_FROM:-auto}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
log() { echo "[build_base] $*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need root to install $*"; exit 1
  fi
  log "installing $* with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# 1. A Docker engine.
if ! command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  apt_install docker.io
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/hvdllm-dockerd.log)"
  nohup dockerd >/var/log/hvdllm-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not start in 60 s; see /var/log/hvdllm-dockerd.log"; exit 1; }
fi

# 2. The base image.
if docker image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG already present"
  echo "$TAG"; exit 0
fi
if [ "$FROM" != debootstrap ]; then
  if timeout 60 docker pull -q debian:bookworm-slim >&2; then
    docker tag debian:bookworm-slim "$TAG"
    log "pulled debian:bookworm-slim as $TAG"
    echo "$TAG"; exit 0
  fi
  [ "$FROM" = pull ] && { log "cannot pull debian:bookworm-slim"; exit 1; }
  log "no registry reachable: building $TAG with debootstrap"
fi
command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
timeout 1200 debootstrap --variant=minbase bookworm "$root" "$MIRROR" >&2
# The same security and update suites a registry's debian image carries.
cat >"$root/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["bash"]' - "$TAG" >&2
log "imported $TAG"
echo "$TAG"
