#!/usr/bin/env bash
# Build the Docker Compose v2 CLI plugin from the Go module proxy and install it as a docker
# CLI plugin, so `docker compose ...` works (Debian ships only the old Python v1
# `docker-compose`).
#
#   tests/tools/compose.sh     # prints the plugin binary's path on the last line of stdout
#
# Output: ${VELO_TOOLS_CACHE:-$HOME/.cache/velo/tools}/compose-<version>/docker-compose, linked
# as ${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose unless a plugin that is not
# ours is already there (a laptop with Docker Desktop keeps its own).
#
# Why a wrapper module: compose's go.mod has an `exclude` block (two go-spew/go-difflib
# pseudo-versions kustomize would otherwise pull in); `go install pkg@version` refuses a
# module with exclude/replace directives, and a dependency's excludes do not apply to the
# main module. So the wrapper go.mod carries the same excludes, copied from upstream's.
# Measured cold: 635 s on this 2-core machine while other Go builds ran (load average ~15).
# Warm: ~10 ms.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

COMPOSE_VERSION=${COMPOSE_VERSION:-v2.40.3}   # docker/compose/v2; client negotiates API >= 1.24
OUT=$TOOLS_CACHE/compose-$COMPOSE_VERSION
WANT="compose=$COMPOSE_VERSION"
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins

install_plugin() {
  mkdir -p "$PLUGIN_DIR"
  local link=$PLUGIN_DIR/docker-compose
  if [ -L "$link" ] && [[ "$(readlink "$link")" == "$TOOLS_CACHE"/compose-* ]]; then
    ln -sfn "$OUT/docker-compose" "$link"            # ours (maybe an older version): update
  elif [ ! -e "$link" ] && [ ! -L "$link" ]; then
    ln -s "$OUT/docker-compose" "$link"
  else
    log "keeping the existing $link (not built by velo)"
  fi
}

if tool_complete "$OUT" "$WANT" docker-compose; then install_plugin; echo "$OUT/docker-compose"; exit 0; fi

need_go 1.24
tool_lock "compose-$COMPOSE_VERSION"
if tool_complete "$OUT" "$WANT" docker-compose; then install_plugin; echo "$OUT/docker-compose"; exit 0; fi

START=$(date +%s)
STAGE=$(tool_stage "compose-$COMPOSE_VERSION")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$STAGE"' EXIT
trap 'log "interrupted"; exit 130' INT TERM

log "building docker compose $COMPOSE_VERSION..."
cd "$WORK"
UPSTREAM_MOD=$(go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" | json_field GoMod)
{
  printf 'module local/compose-build\n\ngo 1.24\n\n'
  # upstream's exclude block, verbatim (and any replace block, should a later version add one)
  awk '/^exclude \(/,/^\)/' "$UPSTREAM_MOD"
  awk '/^replace \(/,/^\)/' "$UPSTREAM_MOD"
} > go.mod
go get -tool "github.com/docker/compose/v2/cmd@$COMPOSE_VERSION"
go build -trimpath \
  -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
  -o "$STAGE/docker-compose" github.com/docker/compose/v2/cmd
"$STAGE/docker-compose" version >&2
tool_finish "$STAGE" "$OUT" "$WANT"
install_plugin
log "built docker compose into $OUT in $(( $(date +%s) - START ))s"
echo "$OUT/docker-compose"
