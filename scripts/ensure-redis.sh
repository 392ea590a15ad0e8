#!/usr/bin/env bash
# The tests start their own redis-server on a free port; this only makes sure the binary exists.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (Debian package) for the tests..."
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
  # Debian starts a system service on install; tests never use it.
  (service redis-server stop || true) >/dev/null 2>&1
else
  echo "redis-server is not installed; install it (e.g. apt-get install redis-server)" >&2
  exit 1
fi
