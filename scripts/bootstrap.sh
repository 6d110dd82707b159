#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtual environment in .venv with the package
# and its dependencies (and, with --dev, the test tools and buf from npm).
# Idempotent and quick when nothing changed: installs are keyed on the files that define them.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

python=${PYTHON:-}
if [[ -z "$python" ]]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python=$candidate
      break
    fi
  done
fi
[[ -n "$python" ]] || { echo "bootstrap: Python 3.11 or newer is required" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  echo "bootstrap: creating .venv with $python" >&2
  "$python" -m venv .venv
fi

extras=""
[[ $dev == 1 ]] && extras="[dev]"
hash="$(sha256sum < pyproject.toml | cut -c1-16)"
stamp=".venv/.installed-${hash}${dev}"
# A dev install includes everything the plain one has.
if [[ ! -f "$stamp" && ! ( $dev == 0 && -f ".venv/.installed-${hash}1" ) ]]; then
  echo "bootstrap: installing llm-loadtest${extras} into .venv (log: .venv/pip.log)" >&2
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e ".${extras}"; } > .venv/pip.log 2>&1; then
    tail -n 40 .venv/pip.log >&2
    echo "bootstrap: pip install failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

if [[ $dev == 1 ]]; then
  lock_stamp="node_modules/.installed-$(cat package.json package-lock.json | sha256sum | cut -c1-16)"
  if [[ ! -f "$lock_stamp" ]]; then
    command -v npm >/dev/null 2>&1 || { echo "bootstrap: npm is required for buf (proto lint)" >&2; exit 1; }
    echo "bootstrap: installing the npm tools (buf, the Node example's gRPC libraries, yaml)" >&2
    npm install --no-audit --no-fund --loglevel=error >&2
    touch "$lock_stamp"
  fi
fi
