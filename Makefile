# Two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

CLUSTER_DIR ?= /tmp/velo-cluster

.PHONY: demo test test-fast bench bench-compare install clean system-deps cluster-bins cluster-up cluster-down env-readers integration-tools image node-bins test-images

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "velo needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes; the plugin in plugins/ is installed
# separately, exactly as a user would install a third-party backend.
$(STAMP): pyproject.toml plugins/velo-tcp/pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet -e plugins/velo-tcp
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/velo demo

# The cluster tests need iproute2 (network namespaces), util-linux and openssl; install
# what is missing when we can (root on Debian), otherwise say what to install.
system-deps:
	@missing=""; for tool in ip unshare mount openssl curl faketime; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && apt-get install -y -qq iproute2 util-linux mount openssl curl faketime >/dev/null; \
	  else echo "missing:$$missing (install iproute2 util-linux openssl curl faketime); cluster tests will be skipped"; fi; \
	fi

# Kubernetes binaries for the cluster tests, built from the Go module proxy into
# ~/.cache/velo/k8s/<version> (cold: ~11 min on 2 cores; a no-op once built).
cluster-bins:
	@if command -v go >/dev/null; then tests/cluster/build.sh; \
	else echo "no Go toolchain: cluster tests will be skipped (an error under CI=true)"; fi

# The real env-file readers the env tests use: Node's dotenv (npm, into ~/.cache/velo/npm)
# and Debian's fish and direnv. A no-op once installed.
env-readers:
	tests/env_readers/install.sh

# The Compose and Tilt tests: a Docker engine (Debian docker.io, started if not running), the
# Compose v2 plugin and tilt, both built from the Go module proxy (+ npm for tilt's web UI)
# into ~/.cache/velo/tools/<tool>-<version> (cold, measured under load on 2 cores: compose 11 min,
# tilt 37 min incl. its web UI; then no-ops).
integration-tools:
	@tests/docker/engine.sh >/dev/null || echo "no Docker engine: Docker tests will be skipped (an error under CI=true)"
	@if command -v go >/dev/null; then tests/tools/compose.sh >/dev/null && tests/tools/tilt.sh >/dev/null; \
	else echo "no Go toolchain: Compose and Tilt tests will be skipped (an error under CI=true)"; fi

# The traffic-proxy image (proxy/Dockerfile), built offline on a local Debian base
# (proxy/base-image.sh: debootstrap) in the Docker engine (tests/docker/engine.sh).
image: $(STAMP)
	PY=$(abspath $(PY)) proxy/build-image.sh

# The real test node: kubelet + kube-proxy (same k8s sources), containerd 2 from the Go module
# proxy, Debian's runc/CNI plugins/iptables (tests/cluster/build-node.sh; cached, version-keyed).
node-bins: cluster-bins
	@if command -v go >/dev/null; then tests/cluster/build-node.sh; \
	else echo "no Go toolchain: real-node tests will be skipped (an error under CI=true)"; fi

# For `make test`: a missing Docker engine is reported by the tests (skip, or fail under CI).
test-images: $(STAMP)
	@PY=$(abspath $(PY)) proxy/build-image.sh || echo "proxy image not built: image/real-node tests will be skipped (an error under CI=true)"

test: $(STAMP) system-deps cluster-bins env-readers integration-tools node-bins test-images
	$(PY) -m pytest

cluster-up: $(STAMP) system-deps cluster-bins
	$(PY) -m tests.cluster.harness start $(CLUSTER_DIR)

cluster-down:
	$(PY) -m tests.cluster.harness stop $(CLUSTER_DIR)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/run.py

# direct vs velo per backend vs kubectl port-forward, loopback and emulated WAN (bench/README.md)
bench-compare: $(STAMP) cluster-bins
	$(PY) bench/compare.py

clean:
	rm -rf $(VENV) .hypothesis build *.egg-info
