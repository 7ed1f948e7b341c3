#!/usr/bin/env bash
# The README's test command: set up whatever is missing, then run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
