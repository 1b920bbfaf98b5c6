#!/usr/bin/env bash
# CI smoke of the load tooling, under ~3 minutes on 2 cores:
#   1. a separate venv .venv-load with the project and its `load` extra (Locust
#      monkey-patches with gevent and registers a pytest plugin, so it must not live in
#      the test venv);
#   2. the acceptance command with ~100 Locust users for ~15 s;
#   3. a --quick bench (every measurement, small sizes; results in *.tmp files);
#   4. the Redis connections' micro-benchmark, small.
# Fails when a step errors or produces no latency samples, never on tight time bounds.
#
#   bash loadtest/smoke.sh            (from anywhere; LOAD_VENV overrides the venv path)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${LOAD_VENV:-$root/.venv-load}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
echo "== installing the project with its load extra into $venv"
"$venv/bin/python" -m pip install --quiet -e '.[load]'
"$venv/bin/python" -c 'import locust, socketio, matplotlib, websockets' >/dev/null

echo "== acceptance (100 users, 15 s)"
timeout 180 "$venv/bin/python" -m loadtest.acceptance --users 100 --duration 15

echo "== bench --quick"
if [ -x config/redis-cluster/cluster.sh ] || [ -f config/redis-cluster/cluster.sh ]; then
    what=(all)
else
    what=(idle propagation fanout peer)
fi
timeout 300 "$venv/bin/python" -m loadtest.bench "${what[@]}" --quick

echo "== redis_wire (small)"
timeout 120 "$venv/bin/python" -m loadtest.redis_wire --runs 1 --trips 300 --messages 2000

echo "== load smoke passed"
