"""The quick start's learning curve: charts/success_rate against env steps for each seed that
benchmarks/quickstart_robustness.py ran from one model (runs named *__quickstart__SEED__*, anywhere under --runs),
their mean, and the random policy's 0.611.
Usage: python -m benchmarks.plot_quickstart [--runs runs/robustness/models-tiny-numberline] [--out FILE.png]"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RANDOM_POLICY = 0.611  # NumberLine, exact by dynamic programming (test_number_line_random_policy_success_rate)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--runs", default="runs/robustness", help="the directory holding the quick-start runs")
parser.add_argument("--out", default="docs/quickstart_curve.png", help="the PNG to write")
a = parser.parse_args()

curves = {}
for run in sorted(p for p in Path(a.runs).rglob("*__quickstart__*") if p.is_dir()):
    seed = run.name.split("__")[2]
    events = EventAccumulator(str(run)).Reload()
    curves[seed] = np.array([(e.step, e.value) for e in events.Scalars("charts/success_rate")])
if not curves:
    parser.error(f"no quick-start runs under {a.runs}: run benchmarks/quickstart_robustness.py first")

fig, ax = plt.subplots(figsize=(7, 4))
for seed, curve in curves.items():
    ax.plot(curve[:, 0], curve[:, 1], lw=0.8, alpha=0.5, label=f"seed {seed}")
length = min(len(c) for c in curves.values())
mean = np.mean([c[:length, 1] for c in curves.values()], axis=0)
ax.plot(next(iter(curves.values()))[:length, 0], mean, color="black", lw=2, label=f"mean of {len(curves)} seeds")
ax.axhline(RANDOM_POLICY, color="red", ls="--", label="uniformly random policy (0.611)")
ax.set(xlabel="env steps", ylabel="success rate per iteration", ylim=(0, 1.02),
       title="VL-DAC quick start: the shipped tiny Qwen2-VL on NumberLine, 2 CPU cores")
ax.legend(loc="lower right")
fig.tight_layout()
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
fig.savefig(a.out, dpi=120)
print(f"{a.out}: {len(curves)} seeds, final-quarter mean success "
      f"{np.mean([c[len(c) * 3 // 4:, 1].mean() for c in curves.values()]):.2f}")
