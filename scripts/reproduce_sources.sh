#!/usr/bin/env bash
# Kept for old links: the source documents' experiments (the MNIST demo, the FashionMNIST
# init-scheme comparison, and the rest) are now part of scripts/reproduce.sh, which runs them
# over several seeds and writes outputs/paper/ (tables, figures, RESULTS.md).
# Arguments are passed on (--quick for the short profile).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "reproduce_sources.sh: running scripts/reproduce.sh $*" >&2
exec bash scripts/reproduce.sh "$@"
