#!/usr/bin/env bash
# The README's main command: set up whatever is missing, then run the end-to-end showcase on real MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/cdi-showcase "$@"
