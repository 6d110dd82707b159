#!/usr/bin/env bash
# The main job in one command: set everything up, then benchmark the built-in mock server.
# Extra arguments go to `llm-loadtest quickstart` (e.g. --db my.db --duration 5s). The run's
# database (llm-loadtest.db unless --db says otherwise) is written to the current directory;
# the last lines printed are the commands that look at the run again.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
"$repo/scripts/bootstrap.sh"
status=0
"$repo/.venv/bin/llm-loadtest" quickstart "$@" || status=$?
# The commands quickstart ends with name `llm-loadtest`: say where it is.
echo "(llm-loadtest is $repo/.venv/bin/llm-loadtest; \`. $repo/.venv/bin/activate\` puts it on your PATH)" >&2
exit "$status"
