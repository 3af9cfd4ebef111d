#!/usr/bin/env bash
# Stop the head that cluster/local-up.sh started (only that one, by its recorded pid).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/lrc-ray cluster down "$@"
