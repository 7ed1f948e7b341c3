#!/usr/bin/env bash
# Re-run the source documents' init-scheme experiments and rebuild their tables and figures:
#   003 (MNIST demo): random (torch default) vs all-zero vs only-fc1-zero vs all-ones, 10 epochs
#   002 (FashionMNIST comparison): zeros, ones, U[0,1], U(+-1/sqrt(fan_in)), N(0, 1/fan_in),
#       and the framework defaults, dense layers with dropout, Adam, 10 epochs
# Output: outputs/sources/{mnist_demo,fashion_init_comparison}/ and outputs/sources/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=outputs/sources
.venv/bin/cdi-train -m experiment=mnist_demo init=torch_default,zeros,partial,ones \
  trainer.enable_progress_bar=false hydra.sweep.dir=$out/mnist_demo "$@"
.venv/bin/cdi-train -m experiment=fashion_init_comparison \
  init=zeros,ones,uniform,uniform_fan_in,normal_fan_in,keras_default,torch_default \
  trainer.enable_progress_bar=false hydra.sweep.dir=$out/fashion_init_comparison "$@"
.venv/bin/cdi-report $out/mnist_demo $out/fashion_init_comparison --out $out/report
