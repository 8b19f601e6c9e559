#!/usr/bin/env bash
# `make image`: build the traffic-proxy image from this repository, offline, on a local base.
#
#   proxy/build-image.sh [TAG]    # default TAG: velo's default proxy_image (what release.yml
#                                 # publishes for this version); prints TAG on the last line
#
# 1. tests/docker/engine.sh: a Docker engine that answers.
# 2. proxy/base-image.sh: Debian bookworm (debootstrap, Debian's python3) imported into Docker.
# 3. A wheelhouse of velo's dependencies for the image's python (cp311, this machine's arch),
#    cached in ${VELO_IMAGE_CACHE:-~/.cache/velo/images}/wheels-<hash of pyproject.toml>/.
# 4. docker build --network none: nothing is pulled; `velo gateway --version` runs in the build.
# Override the base with VELO_PROXY_BASE=python:3.11-slim (then the build may use the network).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
log() { echo "velo-image: $*" >&2; }

TAG=${1:-$("$PY" -c 'from velo.providers.kubernetes.settings import default_proxy_image; print(default_proxy_image())')}
CACHE=${VELO_IMAGE_CACHE:-$HOME/.cache/velo/images}
mkdir -p "$CACHE"

bash tests/docker/engine.sh >/dev/null
BASE=${VELO_PROXY_BASE:-$(bash proxy/base-image.sh | tail -1)}

PIP_ARGS="" NETWORK=default
if [ -z "${VELO_PROXY_BASE:-}" ]; then
  KEY=$(sha256sum pyproject.toml | cut -c1-12)
  WHEELS=$CACHE/wheels-$KEY
  if [ ! -f "$WHEELS/.complete" ]; then
    log "downloading wheels for velo's dependencies (cp311, $(uname -m)) into $WHEELS"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    DEPS=$("$PY" - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
)
    # shellcheck disable=SC2086
    echo "$DEPS" > "$WHEELS/requirements.txt"
    echo "setuptools>=68" >> "$WHEELS/requirements.txt"    # velo's build backend
    "$PY" -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
      --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
      --platform "manylinux2014_$(uname -m)" --platform "manylinux_2_28_$(uname -m)" \
      --platform "manylinux_2_17_$(uname -m)" --platform any -r "$WHEELS/requirements.txt"
    touch "$WHEELS/.complete"
  fi
  find proxy/wheels -name '*.whl' -delete
  cp "$WHEELS"/*.whl proxy/wheels/
  PIP_ARGS="--no-index --find-links /src/wheels"
  NETWORK=none
fi

log "building $TAG on $BASE"
BUILD_LOG=$CACHE/build-image.log
if ! docker build --network "$NETWORK" -f proxy/Dockerfile --build-arg "BASE=$BASE" --build-arg "PIP_ARGS=$PIP_ARGS" \
  --label "dev.velo.version=$("$PY" -c 'import velo; print(velo.__version__)')" -t "$TAG" . >"$BUILD_LOG" 2>&1; then
  find proxy/wheels -name '*.whl' -delete
  log "docker build failed; last lines of $BUILD_LOG:"; tail -n 30 "$BUILD_LOG" >&2; exit 1
fi
find proxy/wheels -name '*.whl' -delete
log "built $TAG: $(docker image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
echo "$TAG"
