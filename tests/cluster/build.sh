#!/usr/bin/env bash
# Build the local Kubernetes control plane used by velo's cluster tests, from the Go module
# proxy only: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok,
# plus kwok's stage config and its two PortForward CRDs.
#
#   tests/cluster/build.sh            # prints the bin dir on the last line of stdout
#
# Output: ${VELO_K8S_CACHE:-$HOME/.cache/velo/k8s}/<K8S_VERSION>/  (outside the repository).
# A marker file (.velo-complete) is written last; when present the script exits at once.
# The build happens in a sibling temp dir that is renamed into place, so an interrupted build
# never looks complete. Concurrent invocations serialise on a lock file.
# Needs: go >= 1.26 (k8s 1.36 staging modules declare go 1.26.0), python3.
# Cold (empty Go caches): 10m40s on 2 cores, ~4.8 GB Go caches, 405 MB output. Warm no-op: ~10 ms.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}    # k8s.io/kubernetes tag; staging modules use v0.X.Y
ETCD_VERSION=${ETCD_VERSION:-v3.6.10}  # go.etcd.io/etcd/server/v3
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}   # sigs.k8s.io/kwok
CACHE=${VELO_K8S_CACHE:-$HOME/.cache/velo/k8s}
OUT=$CACHE/$K8S_VERSION
MARKER=$OUT/.velo-complete
BINS="etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok"
EXTRA="kwok-stages.yaml kwok.x-k8s.io_portforwards.yaml kwok.x-k8s.io_clusterportforwards.yaml"
WANT="k8s=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION"

log() { echo "velo-cluster: $*" >&2; }

complete() {
  [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] || return 1
  local f; for f in $BINS; do [ -x "$OUT/$f" ] || return 1; done
  for f in $EXTRA; do [ -f "$OUT/$f" ] || return 1; done
}

if complete; then echo "$OUT"; exit 0; fi     # fast path: no go, no lock, no work

command -v go >/dev/null || { log "go not found on PATH (need Go >= 1.26)"; exit 2; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
mkdir -p "$CACHE"

# serialise concurrent builds (two test sessions starting at once)
exec 9>"$CACHE/.lock-$K8S_VERSION"
if command -v flock >/dev/null; then
  flock -n 9 || { log "another build of $K8S_VERSION is running; waiting for it..."; flock 9; }
fi
if complete; then echo "$OUT"; exit 0; fi

# leftovers of builds that were killed hard (we hold the lock, so none of them is running)
rm -rf "$CACHE"/.build-"$K8S_VERSION".* "$CACHE"/.old-"$K8S_VERSION".*

START=$(date +%s)
STAGE=$(mktemp -d "$CACHE/.build-$K8S_VERSION.XXXXXX")   # same filesystem as $OUT -> atomic mv
WORK=$(mktemp -d)
cleanup() { rm -rf "$WORK" "$STAGE"; }
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Wrapper go.mod for k8s.io/kubernetes: upstream replaces every staging module with
# ./staging/src/k8s.io/X; a wrapper module ignores a dependency's replaces, so carry one
# `k8s.io/X => k8s.io/X v0.Y.Z` per staging module (33 for 1.36), derived from upstream's go.mod.
gen_k8s_gomod() {
  python3 - "$1" "$2" <<'PY'
import re, sys
mod_path, version = sys.argv[1], sys.argv[2]
m = re.fullmatch(r"v1\.(\d+)\.(\d+)", version)
if not m:
    sys.exit(f"expected a release version like v1.36.3, got {version!r}")
staging = f"v0.{m.group(1)}.{m.group(2)}"
text = open(mod_path, encoding="utf-8").read()
go_line = re.search(r"^go (\S+)", text, re.M)
godebug = re.findall(r"^godebug .*$", text, re.M)
reps = []
for block in re.findall(r"^replace \((.*?)^\)", text, re.M | re.S):
    reps += [l.strip() for l in block.splitlines() if l.strip() and not l.strip().startswith("//")]
reps += [l[len("replace "):].strip() for l in re.findall(r"^replace [^(].*$", text, re.M)]
out = []
for r in reps:
    lhs, rhs = [s.strip() for s in r.split("=>")]
    sm = re.fullmatch(r"\./staging/src/(k8s\.io/[A-Za-z0-9._-]+)", rhs)
    if sm:
        out.append(f"\t{lhs} => {sm.group(1)} {staging}")
    elif rhs.startswith((".", "/")):
        sys.exit(f"unsupported local replace in upstream go.mod: {r}")
    else:
        out.append(f"\t{lhs} => {rhs}")
print("module local/k8s-binaries\n")
print(f"go {go_line.group(1) if go_line else '1.26.0'}\n")
for g in godebug:
    print(g)
print("\nreplace (")
print("\n".join(sorted(out)))
print(")")
print(f"{len(out)} staging replace directives for k8s.io/kubernetes {version}", file=sys.stderr)
PY
}

# go build, retrying once after `go mod tidy` if a go.sum entry is missing
go_build() {
  if ! go build "$@" 2>"$WORK/build.err"; then
    cat "$WORK/build.err" >&2
    if grep -q 'missing go.sum entry' "$WORK/build.err"; then
      log "missing go.sum entry: running go mod tidy and retrying"
      go mod tidy && go build "$@"
    else
      return 1
    fi
  fi
}

# ---- 1. etcd -----------------------------------------------------------------------------------
log "building etcd $ETCD_VERSION..."
mkdir "$WORK/etcd" && cd "$WORK/etcd"
printf 'module local/etcd-build\n\ngo 1.26.0\n' > go.mod
go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"     # package main is server/main.go
go_build -trimpath -ldflags "-s -w" -o "$STAGE/etcd" go.etcd.io/etcd/server/v3

# ---- 2. kwok (no replace directives upstream: go install pkg@version works) ---------------------
log "building kwok $KWOK_VERSION..."
cd "$WORK"
GOBIN="$STAGE" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
KWOK_DIR=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | json_field Dir)
# kwok v0.8.0 has no built-in stages: ship the upstream "fast" stages as one multi-doc config
for f in stage/node/fast/node-initialize.yaml \
         stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
         stage/pod/fast/pod-ready.yaml stage/pod/fast/pod-complete.yaml stage/pod/fast/pod-delete.yaml; do
  echo '---'; cat "$KWOK_DIR/kustomize/$f"
done > "$STAGE/kwok-stages.yaml"
cp "$KWOK_DIR/kustomize/crd/bases/kwok.x-k8s.io_portforwards.yaml" \
   "$KWOK_DIR/kustomize/crd/bases/kwok.x-k8s.io_clusterportforwards.yaml" "$STAGE/"
chmod u+w "$STAGE"/*.yaml   # copied from the read-only module cache

# ---- 3. kube-apiserver, kube-controller-manager, kube-scheduler, kubectl ---------------------
log "resolving k8s.io/kubernetes $K8S_VERSION modules..."
cd "$WORK"
KMOD=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | json_field GoMod)
mkdir k8s && cd k8s
gen_k8s_gomod "$KMOD" "$K8S_VERSION" > go.mod     # replace block BEFORE any go get
CMDS="kube-apiserver kube-controller-manager kube-scheduler kubectl"
PKGS=""; for c in $CMDS; do PKGS="$PKGS k8s.io/kubernetes/cmd/$c"; done
go get -tool $(for p in $PKGS; do echo "$p@$K8S_VERSION"; done)
MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
LDF="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF="$LDF -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean"
done
for c in $CMDS; do
  log "building $c $K8S_VERSION (a cold build of everything takes ~10-25 min)..."
  go_build -trimpath -ldflags "$LDF" -o "$STAGE/$c" "k8s.io/kubernetes/cmd/$c"
done

# ---- 4. smoke check, marker, atomic move --------------------------------------------------------
"$STAGE/kube-apiserver" --version >&2
"$STAGE/etcd" --version 2>&1 | head -1 >&2
"$STAGE/kwok" --version >&2
"$STAGE/kubectl" version --client >&2
echo "$WANT" > "$STAGE/.velo-complete"      # written last
chmod 755 "$STAGE"
if [ -e "$OUT" ]; then                      # stale/incomplete previous output
  mv "$OUT" "$CACHE/.old-$K8S_VERSION.$$" && rm -rf "$CACHE/.old-$K8S_VERSION.$$"
fi
mv "$STAGE" "$OUT"
log "built into $OUT in $(( $(date +%s) - START ))s"
echo "$OUT"
