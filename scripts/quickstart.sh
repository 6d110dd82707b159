#!/usr/bin/env bash
# The main job in one command: set everything up, then benchmark the built-in mock server.
# Extra arguments go to `llm-loadtest quickstart` (e.g. --db my.db --duration 5s). The run's
# database (llm-loadtest.db unless --db says otherwise) is written to the current directory.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
"$repo/scripts/bootstrap.sh"
exec "$repo/.venv/bin/llm-loadtest" quickstart "$@"
