#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, for the Compose tests (and anything else
# that needs a real container runtime).
#
#   tests/docker/engine.sh          # exit 0 once `docker info` answers; prints the socket URL
#
# 1. If `docker info` already answers (a laptop with Docker running), do nothing.
# 2. Otherwise, as root on Debian: install `docker.io` (dockerd, containerd, runc, iptables)
#    when dockerd is missing (and busybox-static, what tests/docker/image.sh builds images from), then start dockerd in the background with flags that work on
#    this machine (a Firecracker VM with a cgroup v1/v2 hybrid: cgroupfs driver, overlay2 on
#    ext4, iptables through Debian's nft backend) and wait until it answers.
# 3. Not root / no apt: say what to install and exit 3 (the tests then skip, or fail under CI).
#
# Idempotent and safe to call concurrently (a lock serialises install and start).
# dockerd's log: ${VELO_DOCKER_STATE:-$HOME/.cache/velo/docker}/dockerd.log
# Cold (apt install + first start): ~40 s. Warm (engine running): ~50 ms.
set -euo pipefail

STATE=${VELO_DOCKER_STATE:-$HOME/.cache/velo/docker}
SOCK=${VELO_DOCKER_SOCK:-/var/run/docker.sock}
LOG=$STATE/dockerd.log
WAIT_S=${VELO_DOCKER_WAIT:-120}

log() { echo "velo-docker: $*" >&2; }
answers() { timeout 20 docker -H "unix://$SOCK" info >/dev/null 2>&1; }

if [ -x /bin/busybox ] && command -v docker >/dev/null && answers; then echo "unix://$SOCK"; exit 0; fi

mkdir -p "$STATE"
exec 9>"$STATE/.lock"
if command -v flock >/dev/null; then
  flock -n 9 || { log "another engine.sh is installing/starting the engine; waiting for it..."; flock 9; }
fi
if [ -x /bin/busybox ] && command -v docker >/dev/null && answers; then echo "unix://$SOCK"; exit 0; fi

if ! command -v dockerd >/dev/null || [ ! -x /bin/busybox ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    command -v dockerd >/dev/null || log "no Docker engine: install Docker (Debian: apt-get install docker.io) and start it"
    [ -x /bin/busybox ] || log "no /bin/busybox for the test image: install it (Debian: apt-get install busybox-static)"
    exit 3
  fi
  log "installing Debian's docker.io (dockerd, containerd, runc, iptables) and busybox-static..."
  export DEBIAN_FRONTEND=noninteractive
  # another helper/CI step may hold the dpkg lock: wait for it instead of failing
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    docker.io containerd runc iptables ca-certificates busybox-static >/dev/null
fi

# a dockerd left over from a killed run (pid file present, process gone) blocks a restart
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
  rm -f /var/run/docker.pid
fi

if ! pgrep -x dockerd >/dev/null; then
  log "starting dockerd (log: $LOG)..."
  # Debian's iptables defaults to the nft backend, which this kernel has; dockerd needs
  # iptables for the bridge's NAT and for host-gateway (containers reaching the host).
  # cgroupfs: there is no systemd here. overlay2 works on ext4; fall back to vfs below.
  DRIVER=${VELO_DOCKER_STORAGE:-overlay2}
  # setsid + nohup: dockerd outlives this script and the test session that called it
  setsid nohup dockerd \
    --host "unix://$SOCK" \
    --exec-opt native.cgroupdriver=cgroupfs \
    --storage-driver "$DRIVER" \
    --iptables=true --ip-forward=true \
    --userland-proxy=true \
    >>"$LOG" 2>&1 </dev/null 9>&- &   # 9>&-: the daemon must not hold our lock
fi

deadline=$(( $(date +%s) + WAIT_S ))
while ! answers; do
  if ! pgrep -x dockerd >/dev/null; then
    log "dockerd exited; last lines of $LOG:"; tail -n 20 "$LOG" >&2; exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "dockerd did not answer within ${WAIT_S}s; last lines of $LOG:"; tail -n 20 "$LOG" >&2; exit 1
  fi
  sleep 0.5
done
log "engine ready: $(docker -H "unix://$SOCK" version --format '{{.Server.Version}}') on unix://$SOCK"
echo "unix://$SOCK"
