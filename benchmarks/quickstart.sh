#!/usr/bin/env bash
# The quick-start acceptance: `python vldac.py --env-id gym_cards/NumberLine-v0` (tiny model, defaults)
# for seeds 1 2 3, one after another, each with its wall time; then the success-rate summary per run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/quickstart
for seed in ${SEEDS:-1 2 3}; do
  start=$(date +%s)
  python vldac.py --env-id gym_cards/NumberLine-v0 --seed "$seed" --exp-name quickstart > "runs/quickstart/seed$seed.log" 2>&1
  echo "seed $seed: $(( $(date +%s) - start )) s wall"
done
python benchmarks/summarize.py runs/quickstart/seed*.log
