#!/usr/bin/env bash
# The real env-file readers the env tests read velo's files back with (tests/test_env_*.py):
# Node's dotenv from npm into ~/.cache/velo/npm/dotenv-<version> (run with the machine's
# Node), and Debian's fish and direnv. python-dotenv comes from PyPI through pyproject's test extra.
# Idempotent: a no-op once installed. Missing tools only make those readers skip (an error
# under CI=true).
set -euo pipefail
DOTENV_VERSION=18.0.10
CACHE=${VELO_NPM_CACHE:-$HOME/.cache/velo/npm}
dest="$CACHE/dotenv-$DOTENV_VERSION"
log() { echo "env-readers: $*" >&2; }

if [ -f "$dest/.velo-complete" ]; then :
elif command -v npm >/dev/null; then
  mkdir -p "$CACHE"
  stage=$(mktemp -d "$CACHE/.build-dotenv.XXXXXX")
  log "npm install dotenv@$DOTENV_VERSION -> $dest"
  (cd "$stage" && echo '{"private": true}' > package.json \
     && npm install --silent --no-audit --no-fund --no-package-lock "dotenv@$DOTENV_VERSION" >/dev/null)
  touch "$stage/.velo-complete"
  rm -rf "$dest" && mv "$stage" "$dest"
else
  log "no npm: the Node dotenv reader test will be skipped"
fi

for tool in fish direnv; do
  command -v $tool >/dev/null && continue
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install $tool"
    apt-get install -y -qq $tool >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $tool >/dev/null; }
  else
    log "no $tool (install Debian's $tool package); its reader test will be skipped"
  fi
done
