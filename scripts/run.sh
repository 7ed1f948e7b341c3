#!/usr/bin/env bash
# The README's main command: set up whatever is missing, then run the default experiment
# (real MNIST, deterministic He init, per-epoch awakened shares, prune-and-evaluate).
# Extra arguments are Hydra overrides, e.g.: bash scripts/run.sh init=zeros trainer.max_epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/cdi-train "$@"
