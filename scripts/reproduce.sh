#!/usr/bin/env bash
# Reproduce every experiment of the paper and build its tables, figures and RESULTS.md.
#
#   scripts/reproduce.sh            full profile: 3 seeds per cell  -> outputs/paper/
#   scripts/reproduce.sh --quick    quick profile: 1 seed, 2 epochs, 1000-image subsets
#                                   -> outputs/paper-quick/ (minutes; run by the tests)
#   scripts/reproduce.sh --out DIR  write somewhere else (either profile)
#   scripts/reproduce.sh -- k=v ... extra Hydra overrides for every cdi-train sweep
#
# Relaunching the same command resumes: finished sweep jobs are skipped (cdi-train -m),
# an interrupted one continues from its last checkpoint, and the signal-propagation and
# benchmark files are kept once written. The paper is rebuilt from whatever has finished, so
# RESULTS.md says "not measured" for experiments that have not run yet.
#
# The experiments are the experiment= presets in configs/experiment/ (each sweeps its own grid
# through hydra.sweeper.params); the profile only sets the seeds and the budget (epochs, data
# subsets), and RESULTS.md lists the settings every experiment actually ran with.
# The body is one { ...; exit; } block: bash reads it whole before running it, so editing this
# file while a (long) run is going does not change or break that run.
{
set -euo pipefail
cd "$(dirname "$0")/.."

profile=full
out=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) profile=quick ;;
    --full) profile=full ;;
    --out) out="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "reproduce.sh: unknown argument '$1'; use --quick, --out DIR or -- key=value ..." >&2
       exit 2 ;;
  esac
  shift
done

bash scripts/bootstrap.sh

if [ "$profile" = quick ]; then
  out=${out:-outputs/paper-quick}
  seeds=0
  signal=(--seeds 0 --width 64)
  # every experiment, 2 epochs on 1000 images; the sleeping grid on MNIST only
  common=(trainer.max_epochs=2 data.limit=1000)
  demo=(); comparison=(); sleeping=(data=mnist)
  pruning=(prune.sparsities=[0.5,0.9] prune.finetune_epochs=1 prune.retrain_epochs=1)
else
  out=${out:-outputs/paper}
  seeds=0,1,2
  signal=(--seeds 0 1 2)
  # budgeted for about 60 minutes on 2 cores (see RESULTS.md for what each experiment ran):
  # 10 epochs everywhere, training subsets of 10000 images (5000 for the 72-run sleeping grid)
  common=()
  demo=(data.limit=10000); comparison=(data.limit=10000); sleeping=(data.limit=5000)
  pruning=(data.limit=10000 prune.sparsities=[0.5,0.9,0.99])
fi
mkdir -p "$out"
[ -f "$out/started_at.txt" ] || date -u +%Y-%m-%dT%H:%M:%SZ > "$out/started_at.txt"
launched=$(date -u +%Y-%m-%dT%H:%M:%SZ)
cmd="scripts/reproduce.sh"
[ "$profile" = quick ] && cmd="$cmd --quick"
echo "[reproduce] profile $profile -> $out ($(date -u +%H:%M:%S) UTC)"

# 6. the generator benchmark first, while nothing else of ours runs (kept once written);
# quick: the 1M-weight timing only (the full script also times the numpy fallback: minutes)
if [ ! -s "$out/bench/bench_generator.txt" ]; then
  mkdir -p "$out/bench"
  if [ "$profile" = quick ]; then
    .venv/bin/python -m cdi_experiments.run.paper bench --out "$out" --repeats 5
  else
    .venv/bin/python scripts/bench_generator.py --repeats 7 --threads 2 \
      > "$out/bench/bench_generator.txt.tmp"
    mv "$out/bench/bench_generator.txt.tmp" "$out/bench/bench_generator.txt"
  fi
fi

# Training sweeps: two jobs at a time (joblib), one thread each. numba too: its 2-thread
# kernels (the per-epoch w0 regeneration) run ~10x slower when two jobs share two busy cores.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
sweep() {  # sweep <experiment> <overrides...>
  local name=$1; shift
  local dir="$out/runs/$name"
  local args=("experiment=$name" "seed=$seeds" launcher=joblib
    trainer.enable_progress_bar=false ++trainer.enable_model_summary=false
    "hydra.sweep.dir=$dir" "$@" ${extra[@]+"${extra[@]}"})
  # a sweep that finished every job with these exact arguments is not relaunched at all
  # (cdi-train would skip each job too, but that costs seconds per job); delete the marker to
  # have cdi-train check every job again
  if [ -f "$dir/.reproduce_done" ] && [ "$(cat "$dir/.reproduce_done")" = "${args[*]}" ]; then
    echo "[reproduce] experiment=$name: every job finished, skipped"
    return
  fi
  echo "[reproduce] experiment=$name ($(date -u +%H:%M:%S) UTC)"
  .venv/bin/cdi-train -m "${args[@]}"
  printf '%s' "${args[*]}" > "$dir/.reproduce_done"  # reached only if every job finished
}

# 5. signal propagation at init (no training)
.venv/bin/python -m cdi_experiments.run.paper signal --out "$out" "${signal[@]}"
# 2. MNIST demo, 4. pruning, 1. init comparison, 3. sleeping weights (the largest grid last)
sweep mnist_demo ${common[@]+"${common[@]}"} ${demo[@]+"${demo[@]}"}
sweep pruning ${common[@]+"${common[@]}"} ${pruning[@]+"${pruning[@]}"}
sweep fashion_init_comparison ${common[@]+"${common[@]}"} ${comparison[@]+"${comparison[@]}"}
sweep sleeping ${common[@]+"${common[@]}"} ${sleeping[@]+"${sleeping[@]}"}
unset OMP_NUM_THREADS MKL_NUM_THREADS NUMBA_NUM_THREADS

# this launch's start and the end of its experiments (RESULTS.md lists every launch)
echo "$launched $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$out/launches.txt"
# Tables, figures, RESULTS.md
.venv/bin/python -m cdi_experiments.run.paper build --out "$out" --profile "$profile" --command "$cmd"
echo "[reproduce] done: $out/RESULTS.md ($(date -u +%H:%M:%S) UTC)"
exit 0
}
