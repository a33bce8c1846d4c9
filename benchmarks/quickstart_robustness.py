"""The quick start from several tiny NumberLine models and seeds: `python vldac.py --env-id gym_cards/NumberLine-v0
--model-id MODEL --seed SEED` with the tiny defaults, per model x seed. Writes OUT/robustness.md and prints it:
env steps (and minutes) at which the success rate, averaged over 3 iterations, first reaches 0.9; the success rate over
the episodes that ended in the last quarter of the env steps; the 50 greedy evaluation episodes that end the run
(Wilson 95% interval); the caption probe (200 held-out frames) of the model before and after RL. Resumable: a run
whose log holds its evaluation is not redone. Runs as child processes with one thread each, --jobs at a time.
    python -m benchmarks.quickstart_robustness --models models/tiny-numberline --seeds 1 2 3 4 5 --jobs 2
    python tiny_vlm.py --build numberline --seed 1 --out runs/builds/seed1      # another build to try it on
    python -m benchmarks.quickstart_robustness --models runs/builds/seed1/tiny-numberline --seeds 1 2
"""
import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "gym_cards/NumberLine-v0"


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_name(model, seed):
    return f"{Path(model).resolve().parent.name}-{Path(model).name}__seed{seed}"


def train(model, seed, out, extra):
    """One quick start in OUT/NAME (its log: OUT/NAME/log.txt), unless its log already ends with the evaluation."""
    work = out / run_name(model, seed)
    log = work / "log.txt"
    if log.exists() and "eval: success" in log.read_text():
        return
    work.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(ROOT / "vldac.py"), "--env-id", ENV_ID,
                        "--model-id", str(Path(model).resolve()), "--seed", str(seed), "--exp-name", "quickstart",
                        *extra], cwd=work, stdout=f, stderr=subprocess.STDOUT, env=child_env(), check=False)


def caption(model):
    """Caption accuracy of the model directory on 200 held-out NumberLine frames, in a one-thread child process."""
    code = ("import sys, tiny_vlm; m, p = tiny_vlm.load(sys.argv[1]); "
            f"print(tiny_vlm.caption_accuracy(m, p, {ENV_ID!r}, 200))")
    result = subprocess.run([sys.executable, "-c", code, str(model)], cwd=ROOT, capture_output=True, text=True,
                            env=child_env(), check=True)
    return float(result.stdout.split()[-1])


def summarize(log_text):
    """From a vldac.py stdout: (env steps and seconds at 0.9, last-quarter success over episodes, episodes, eval)."""
    rows = [(int(m[1]), float(m[2]), float(m[3]), int(m[4])) for m in re.finditer(
        r"steps (\d+) SPS ([\d.]+) \| success ([\d.]+) return \S+ \((\d+) episodes\)", log_text)]
    steps, sps, success, episodes = zip(*rows)
    hit = next((i for i in range(len(success) - 2) if sum(success[i : i + 3]) / 3 >= 0.9), None)
    quarter = [i for i, s in enumerate(steps) if s > steps[-1] * 3 // 4]
    won = sum(success[i] * episodes[i] for i in quarter)
    ended = sum(episodes[i] for i in quarter)
    evaluation = re.search(r"eval: success ([\d.]+) \[([\d.]+), ([\d.]+)\]", log_text)
    return dict(steps_to_09=steps[hit] if hit is not None else None,
                seconds_to_09=round(steps[hit] / sps[hit]) if hit is not None else None,
                last_quarter=won / ended, last_quarter_episodes=ended,
                greedy=[float(x) for x in evaluation.groups()] if evaluation else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[str(ROOT / "models" / "tiny-numberline")],
                        help="tiny NumberLine model directories (default: the shipped one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="RL seeds per model")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default="runs/robustness", help="where the runs and robustness.md go")
    parser.add_argument("--extra", default="", help="more vldac.py flags for every run, as one string")
    a = parser.parse_args()
    if a.jobs < 1:
        parser.error("--jobs must be >= 1")
    out = Path(a.out).resolve()
    jobs = [(m, s) for m in a.models for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda job: train(*job, out, a.extra.split()), jobs))
        before = dict(zip(a.models, pool.map(caption, a.models)))
        after = list(pool.map(lambda job: caption(next((out / run_name(*job) / "runs").glob("*/model"))), jobs))
    lines = ["| model | seed | env steps to 0.9 (minutes) | last-quarter success (episodes) | greedy eval, 50 "
             "episodes | caption before -> after |", "|---|---|---|---|---|---|"]
    records = []
    for (model, seed), caption_after in zip(jobs, after):
        r = summarize((out / run_name(model, seed) / "log.txt").read_text())
        r.update(model=model, seed=seed, caption_before=before[model], caption_after=caption_after)
        records.append(r)
        to09 = f"{r['steps_to_09']:,} ({r['seconds_to_09'] / 60:.1f})" if r["steps_to_09"] else "never"
        greedy = "{:.2f} [{:.2f}, {:.2f}]".format(*r["greedy"]) if r["greedy"] else "-"
        lines.append(f"| {model} | {seed} | {to09} | {r['last_quarter']:.3f} ({r['last_quarter_episodes']}) | "
                     f"{greedy} | {r['caption_before']:.3f} -> {r['caption_after']:.3f} |")
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    (out / "robustness.json").write_text(json.dumps(records, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
