# Shared by the tool build scripts in tests/tools/ (sourced, not run).
#
# Every tool is built from the Go module proxy (or npm) into a version-keyed directory
#   ${VELO_TOOLS_CACHE:-$HOME/.cache/velo/tools}/<tool>-<version>/
# outside the repository. The build happens in a sibling temp dir renamed into place, a
# marker file (.velo-complete) is written last, and concurrent builds of the same tool
# serialise on a lock: an interrupted build never looks complete, a finished one is a no-op.

TOOLS_CACHE=${VELO_TOOLS_CACHE:-$HOME/.cache/velo/tools}

log() { echo "velo-tools: $*" >&2; }

# tool_complete DIR WANT FILE...: the marker says WANT and every FILE is there
tool_complete() {
  local dir=$1 want=$2; shift 2
  [ -f "$dir/.velo-complete" ] && [ "$(cat "$dir/.velo-complete")" = "$want" ] || return 1
  local f; for f in "$@"; do [ -e "$dir/$f" ] || return 1; done
}

# tool_lock NAME: take the build lock for NAME (waits for a concurrent build)
tool_lock() {
  mkdir -p "$TOOLS_CACHE"
  exec 9>"$TOOLS_CACHE/.lock-$1"
  if command -v flock >/dev/null; then
    flock -n 9 || { log "another build of $1 is running; waiting for it..."; flock 9; }
  fi
}

# tool_stage NAME: a fresh staging dir on the cache's filesystem (atomic rename later);
# removes leftovers of builds killed hard (we hold the lock, so none is running)
tool_stage() {
  rm -rf "$TOOLS_CACHE"/.build-"$1".* "$TOOLS_CACHE"/.old-"$1".*
  mktemp -d "$TOOLS_CACHE/.build-$1.XXXXXX"
}

# tool_finish STAGE OUT WANT: write the marker last, then move into place
tool_finish() {
  local stage=$1 out=$2 want=$3 name
  name=$(basename "$out")
  echo "$want" > "$stage/.velo-complete"
  chmod 755 "$stage"
  if [ -e "$out" ]; then mv "$out" "$TOOLS_CACHE/.old-$name.$$" && rm -rf "$TOOLS_CACHE/.old-$name.$$"; fi
  mv "$stage" "$out"
}

need_go() {
  command -v go >/dev/null || { log "go not found on PATH (need Go >= ${1:-1.24})"; exit 2; }
  export GOTOOLCHAIN=local CGO_ENABLED=${CGO_ENABLED:-0} GOFLAGS="${GOFLAGS:--buildvcs=false}"
}

json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
