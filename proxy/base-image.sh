#!/usr/bin/env bash
# A local base image for the traffic-proxy (and the test sample app) when no registry is
# reachable: Debian bookworm from debootstrap (Debian's own python3 + venv), imported into the
# Docker engine. Users never need this: proxy/Dockerfile defaults to a public base.
#
#   proxy/base-image.sh        # prints the image reference (velo-base:bookworm-<key>) last
#
# Cache: ${VELO_IMAGE_CACHE:-$HOME/.cache/velo/images}/<key>.tar (the rootfs tarball), and the
# tag in Docker. Both are keyed by the package list below, so changing it rebuilds. Idempotent,
# serialised by a lock. Cold: ~2-4 min (debootstrap downloads ~40 MB of .debs); warm: ~0.1 s.
set -euo pipefail

SUITE=bookworm
MIRROR=${VELO_DEBIAN_MIRROR:-http://deb.debian.org/debian}
INCLUDE=python3,python3-venv,ca-certificates
KEY=$(printf '%s %s v1' "$SUITE" "$INCLUDE" | sha256sum | cut -c1-12)
TAG=velo-base:$SUITE-$KEY
CACHE=${VELO_IMAGE_CACHE:-$HOME/.cache/velo/images}
TAR=$CACHE/base-$SUITE-$KEY.tar

log() { echo "velo-base-image: $*" >&2; }
have_image() { docker image inspect "$TAG" >/dev/null 2>&1; }

if have_image; then echo "$TAG"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-base"
flock -n 9 || { log "another base-image build is running; waiting..."; flock 9; }
if have_image; then echo "$TAG"; exit 0; fi

if [ ! -f "$TAR" ]; then
  if ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || { log "need root (debootstrap)"; exit 3; }
    log "installing debootstrap..."
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends debootstrap >/dev/null \
      || { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends debootstrap >/dev/null; }
  fi
  ROOT=$(mktemp -d "$CACHE/.root-$KEY.XXXXXX")
  trap 'rm -rf "$ROOT" "$TAR.tmp"' EXIT
  log "debootstrap $SUITE (minbase + $INCLUDE) from $MIRROR..."
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap-$KEY.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap-$KEY.log" >&2; exit 1; }
  # what a container never needs: package caches and lists, docs, man pages, locales
  rm -rf "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* \
         "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/var/log/* "$ROOT"/usr/share/locale/*
  find "$ROOT"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
  tar --numeric-owner -C "$ROOT" -cf "$TAR.tmp" .
  mv "$TAR.tmp" "$TAR"
fi
log "importing $TAR as $TAG"
docker import -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["python3"]' -m "debootstrap $SUITE $INCLUDE" "$TAR" "$TAG" >/dev/null
echo "$TAG"
