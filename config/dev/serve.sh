#!/usr/bin/env bash
# Set up and run one gateway on the embedded in-memory backend (no Redis needed).
# Extra arguments go to `presence serve` (e.g. --port 8765 --demo).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash config/dev/setup.sh --server
exec .venv/bin/presence serve "$@"
