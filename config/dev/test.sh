#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, lint, types, tests (a real
# 6-node Redis Cluster is started by the test fixtures on loopback), load-test smoke.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash config/dev/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
if [ -f loadtest/smoke.sh ] && [ -z "${PRESENCE_SKIP_LOADTEST:-}" ]; then
    echo "== load-test smoke"
    bash loadtest/smoke.sh
fi
