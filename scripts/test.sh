#!/usr/bin/env bash
# The whole test suite in one command: set up, lint the API, check the generated stubs,
# lint the code, run every test. Extra arguments go to pytest, e.g. the fast run (no real
# llm-loadtest processes, no llama-server):
#   scripts/test.sh -m 'not e2e and not realserver'
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev

echo "== buf lint" >&2
npx --no-install buf lint
echo "== buf breaking (against the previous commit's protos)" >&2
if previous=$(git rev-parse --verify -q 'HEAD~1^{commit}' 2>/dev/null); then
  npx --no-install buf breaking --against ".git#ref=${previous}"
else
  # A fresh repository, or a clone of depth 1: no earlier protos to compare with.
  echo "buf breaking: skipped, this clone has no commit before HEAD (clone with --depth 2 or more to check)" >&2
fi
echo "== generated stubs are fresh" >&2
.venv/bin/python scripts/gen_protos.py --check
echo "== generated docs are fresh (docs/api.md, docs/configuration.md)" >&2
.venv/bin/python scripts/gen_api_docs.py --check
.venv/bin/python scripts/gen_config_docs.py --check
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== import-linter: the layer contracts in pyproject.toml" >&2
.venv/bin/lint-imports --no-cache --no-logo
if [[ $# == 0 ]]; then
  echo "== llama-server for tests/realserver (built from source once per machine, then cached)" >&2
  time scripts/build_llama_server.sh >/dev/null
else
  # Arguments may deselect the tier (-m 'not realserver'): then nothing is built. pytest
  # builds it itself when the tests it selects include tests/realserver (see its conftest.py).
  echo "== llama-server: built by pytest if the selected tests include tests/realserver" >&2
fi
echo "== pytest" >&2
status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
if [[ $status == 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $status
