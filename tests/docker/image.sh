#!/usr/bin/env bash
# Build the tiny test image velo-test/busybox:<busybox version> from local files only (no
# registry can be pulled from here): Debian's static busybox on FROM scratch, with its
# applets (sh, wget, httpd, nc, ...) linked into /bin.
#
#   tests/docker/image.sh      # prints the image reference on the last line of stdout
#
# Needs a running engine (tests/docker/engine.sh) and /bin/busybox (Debian: busybox-static).
# A no-op when the image exists. Uses the classic builder (no buildx plugin needed).
set -euo pipefail
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "velo-docker: $BUSYBOX not found (Debian: apt-get install busybox-static)" >&2; exit 3; }
file_of() { LC_ALL=C "$BUSYBOX" 2>&1 | head -1 | awk '{print $2}' | tr -d 'v'; }
VERSION=$(file_of)
IMAGE=velo-test/busybox:${VERSION:-unknown}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "$IMAGE"; exit 0; fi

CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
cp "$BUSYBOX" "$CTX/busybox"
cat > "$CTX/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
CMD ["/bin/sh"]
DOCKERFILE
if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" "$CTX" 2>&1); then
  echo "velo-docker: docker build of $IMAGE failed: $(echo "$out" | grep -v -i 'deprecated\|legacy builder\|buildx' | tail -n 3)" >&2
  exit 1
fi
echo "velo-docker: built $IMAGE" >&2
echo "$IMAGE"
