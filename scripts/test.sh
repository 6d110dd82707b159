#!/usr/bin/env bash
# The whole test suite in one command: set up, lint the API, check the generated stubs,
# lint the code, run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev

echo "== buf lint" >&2
npx --no-install buf lint
echo "== generated stubs are fresh" >&2
.venv/bin/python scripts/gen_protos.py --check
echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
if [[ $status == 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $status
