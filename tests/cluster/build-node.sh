#!/usr/bin/env bash
# Build the pieces of a REAL test node (tests/cluster/node.py): kubelet and kube-proxy from the
# same Kubernetes sources as the control plane (tests/cluster/build.sh), containerd 2 + its runc
# shim + ctr from the Go module proxy, and install Debian's runc, CNI plugins, iptables, conntrack.
#
#   tests/cluster/build-node.sh        # prints the bin dir on the last line of stdout
#
# Output: ${VELO_K8S_CACHE:-$HOME/.cache/velo/k8s}/node-<K8S_VERSION>-containerd-<CONTAINERD_VERSION>/
# Same contract as build.sh: version-keyed, marker written last, built in a temp dir renamed into
# place, concurrent runs serialise on a lock, a complete cache is a ~10 ms no-op.
#
# Why containerd from the Go proxy: Debian bookworm ships containerd 1.6.20; kubelet 1.36 wants a
# containerd 2.x CRI (containerd 1.x support ends with Kubernetes 1.35). containerd 2.2 still
# supports cgroup v1, which this machine's v1/v2 hybrid needs (the controllers live on v1).
# Cold (Go caches warm from build.sh): ~4-6 min on 2 cores; warm no-op ~10 ms.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.2.9}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VELO_K8S_CACHE:-$HOME/.cache/velo/k8s}
OUT=$CACHE/node-$K8S_VERSION-containerd-$CONTAINERD_VERSION
MARKER=$OUT/.velo-complete
BINS="kubelet kube-proxy containerd containerd-shim-runc-v2 ctr"
WANT="k8s=$K8S_VERSION containerd=$CONTAINERD_VERSION"
APT_PKGS="runc containernetworking-plugins iptables conntrack ethtool socat"
APT_CHECK="/usr/sbin/runc /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/sbin/iptables /usr/sbin/conntrack"

log() { echo "velo-node-build: $*" >&2; }

apt_ok() { local f; for f in $APT_CHECK; do [ -x "$f" ] || return 1; done; }
complete() {
  apt_ok || return 1
  [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] || return 1
  local f; for f in $BINS; do [ -x "$OUT/$f" ] || return 1; done
}

if complete; then echo "$OUT"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-node-$K8S_VERSION"
flock -n 9 || { log "another node build is running; waiting for it..."; flock 9; }
if complete; then echo "$OUT"; exit 0; fi

if ! apt_ok; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { log "need root + apt-get for: $APT_PKGS"; exit 3; }
  log "installing Debian packages: $APT_PKGS"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $APT_PKGS >/dev/null
fi
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ]; then echo "$OUT"; exit 0; fi

command -v go >/dev/null || { log "go not found on PATH (need Go >= 1.26)"; exit 2; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
rm -rf "$CACHE"/.build-node-* 
START=$(date +%s)
STAGE=$(mktemp -d "$CACHE/.build-node-$K8S_VERSION.XXXXXX")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$STAGE"' EXIT
trap 'log "interrupted"; exit 130' INT TERM
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# ---- 1. containerd 2 (no replace directives upstream) ------------------------------------------
log "building containerd $CONTAINERD_VERSION..."
CD=github.com/containerd/containerd/v2
CD_LDF="-s -w -X $CD/version.Version=$CONTAINERD_VERSION -X $CD/version.Package=$CD"
for c in containerd containerd-shim-runc-v2 ctr; do
  GOBIN="$STAGE" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" -ldflags "$CD_LDF" "$CD/cmd/$c@$CONTAINERD_VERSION"
done

# ---- 2. kubelet, kube-proxy: the wrapper module of build.sh (it shares the Go build cache) ------
log "waiting for / running the control-plane build (tests/cluster/build.sh)..."
bash "$HERE/build.sh" >/dev/null
log "building kubelet and kube-proxy $K8S_VERSION..."
cd "$WORK"
KMOD=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | json_field GoMod)
mkdir k8s && cd k8s
# reuse build.sh's go.mod generator (the function body), so both wrappers stay identical
source <(sed -n '/^gen_k8s_gomod() {/,/^}/p' "$HERE/build.sh")
gen_k8s_gomod "$KMOD" "$K8S_VERSION" > go.mod
go get -tool "k8s.io/kubernetes/cmd/kubelet@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-proxy@$K8S_VERSION"
MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
LDF="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF="$LDF -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean"
done
for c in kubelet kube-proxy; do
  log "building $c..."
  go build -trimpath -ldflags "$LDF" -o "$STAGE/$c" "k8s.io/kubernetes/cmd/$c" || { go mod tidy && go build -trimpath -ldflags "$LDF" -o "$STAGE/$c" "k8s.io/kubernetes/cmd/$c"; }
done

"$STAGE/kubelet" --version >&2
"$STAGE/containerd" --version >&2
echo "$WANT" > "$STAGE/.velo-complete"
chmod 755 "$STAGE"
[ -e "$OUT" ] && rm -rf "$OUT"
mv "$STAGE" "$OUT"
log "built into $OUT in $(( $(date +%s) - START ))s"
echo "$OUT"
