#!/usr/bin/env bash
# The main job in one command: set everything up, then benchmark the built-in mock server.
# Extra arguments go to `llm-loadtest quickstart` (e.g. --db my.db --duration 5s).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/llm-loadtest quickstart "$@"
