#!/bin/sh
# Builds toxiproxy's server from the Go module proxy into a version-keyed cache
# (~/.cache/velo/toxiproxy/<version>/toxiproxy-server) and prints its path.
# Idempotent: a no-op once built.  The kernel here has no netem; toxiproxy's
# latency and bandwidth toxics emulate the WAN for bench/run.py --wan.
set -eu
VERSION=v2.12.0
DIR="${VELO_CACHE:-$HOME/.cache/velo}/toxiproxy/$VERSION"
BIN="$DIR/toxiproxy-server"
if [ ! -x "$BIN" ]; then
  command -v go >/dev/null || { echo "toxiproxy: no Go toolchain (needed to build toxiproxy $VERSION)" >&2; exit 3; }
  mkdir -p "$DIR"
  GOBIN="$DIR/bin.tmp" GOFLAGS=-mod=mod go install "github.com/Shopify/toxiproxy/v2/cmd/server@$VERSION" >&2
  mv "$DIR/bin.tmp/server" "$BIN"
  rmdir "$DIR/bin.tmp"
fi
echo "$BIN"
