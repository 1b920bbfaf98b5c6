#!/usr/bin/env bash
# Set up everything the server and its tests need on a fresh Debian machine:
# a virtualenv in .venv with the project and its test dependencies, and redis-server
# (Debian's package) for the Redis Cluster tests. Idempotent; safe to run again.
#   bash config/dev/setup.sh          # server + tests
#   bash config/dev/setup.sh --server # server only (no apt, no test tools)
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Python 3.11 or newer is required (found: $("$PY" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--server" ]; then
    .venv/bin/python -m pip install --quiet -e .
    exit 0
fi
.venv/bin/python -m pip install --quiet -e '.[test]'

apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    if [ -z "${APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "setup: installing redis-server (Debian package)"
    apt_install redis-server
fi
if [ -z "${PRESENCE_SKIP_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing chromium (Debian package) for the browser tests"
    apt_install chromium || echo "setup: chromium not installed; browser tests will be skipped" >&2
fi
