#!/usr/bin/env bash
# Start a local Ray head (dashboard + job server on 127.0.0.1, token authentication on) for
# `ray job submit`; its state, token and logs go to .lrc_ray/cluster/. Options: see
# `lrc-ray cluster up --help`. Then: source .lrc_ray/cluster/env.sh && ray job submit ...
set -euo pipefail
cd "$(dirname "$0")/.."
make --quiet install
exec .venv/bin/lrc-ray cluster up "$@"
