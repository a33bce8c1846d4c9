#!/usr/bin/env bash
# The quick-start acceptance: `python vldac.py --env-id gym_cards/NumberLine-v0` (tiny model, defaults)
# for seeds 1 2 3, one after another, each with its wall time; then the success-rate summary per run.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  echo "usage: [SEEDS='1 2 3'] bash benchmarks/quickstart.sh"
  echo "The quick start (tiny model, NumberLine, defaults) per seed, logs in runs/quickstart/, then their summary"
  echo "and the learning-curve figure docs/quickstart_curve.png."
  exit 0
fi
cd "$(dirname "$0")/.."
mkdir -p runs/quickstart
for seed in ${SEEDS:-1 2 3}; do
  start=$(date +%s)
  python vldac.py --env-id gym_cards/NumberLine-v0 --seed "$seed" --exp-name quickstart > "runs/quickstart/seed$seed.log" 2>&1
  echo "seed $seed: $(( $(date +%s) - start )) s wall"
done
python benchmarks/summarize.py runs/quickstart/seed*.log
python benchmarks/plot_quickstart.py --out docs/quickstart_curve.png
