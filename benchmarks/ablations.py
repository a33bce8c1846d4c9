"""Ablations on the tiny model: VL-DAC against RL4VLM (its policy loss with VL-DAC's stabilisers, as published,
and the ladder in between) and LOOP, and VL-DAC without each of its stabilisers. Runs variants x envs x seeds of
`python vldac.py`, --jobs at a time with one thread each, then writes a markdown table to OUT/results.md and a
learning-curve PNG per env to OUT/ENV.png (mean over seeds, +- std band, one line per variant), and prints it. Run:
    python -m benchmarks.ablations                                          # the full benchmark
    python -m benchmarks.ablations --total-timesteps 256 --seeds 1 --variants vldac rl4vlm-0.5 --out /tmp/abl
Resumable: a run whose result.json was written by the same command is skipped, so an interrupted benchmark
continues where it stopped. Each run lives in OUT/{env}/{variant}/seed{S}/: train.log (stdout), runs/
(TensorBoard; vldac.py runs with that directory as its working directory), model/, result.json.

Per env and variant, over seeds (mean +- sample std), from `charts/success_rate` per iteration:
- final success: mean of the last 4 iterations;
- peak success: the maximum of the 3-iteration moving average;
- env steps to target: the first iteration whose 3-iteration moving average (that iteration and the two
  before it) reaches --target, as env steps; mean over the seeds that reached it, and how many did;
- caption accuracy on the run's env (tiny_vlm.caption_accuracy) of the base model and of each trained model:
  does RL degrade image understanding?
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# variant -> extra vldac.py flags; every variant changes one thing relative to VL-DAC as shipped
# (per-token PPO, 2 value-only warm-up updates, value head on the detached hidden state, KL beta 0.05)
VARIANTS = {
    "vldac": [],
    **{f"rl4vlm-{lam}": ["--policy-loss", "rl4vlm", "--thought-coef", str(lam)] for lam in (0.2, 0.35, 0.5, 1.0)},
    "vldac-no-warmup": ["--value-warmup-iters", "0"],
    "vldac-no-stopgrad": ["--no-value-stop-grad"],
    "vldac-no-kl": ["--kl-beta", "0"],
    # the baselines as published, and RL4VLM gaining VL-DAC's stabilisers one by one (+ KL is rl4vlm-0.5 above)
    **{f"rl4vlm-published-{lam}": ["--baseline", "rl4vlm", "--thought-coef", str(lam)] for lam in (0.35, 0.5)},
    "rl4vlm-0.5+warmup": ["--policy-loss", "rl4vlm", "--thought-coef", "0.5", "--kl-beta", "0", "--no-value-stop-grad"],
    "rl4vlm-0.5+warmup+stopgrad": ["--policy-loss", "rl4vlm", "--thought-coef", "0.5", "--kl-beta", "0"],
    "loop": ["--baseline", "loop"],
}
# not the paper, and not in this script's default set: diagnostics for sparse rewards (learning.py --variants)
DIAGNOSTICS = {"vldac-no-norm": ["--no-norm-adv"], "vldac-shaped": ["--reward-shaping", "0.3"]}  # shaped: MiniWorld
PAPER_VARIANTS = list(VARIANTS)
VARIANTS.update(DIAGNOSTICS)
# success rate to count "env steps to reach"; envs left out get no such column
DEFAULT_TARGETS = {"gym_cards/NumberLine-v0": 0.9}


def probe(model_id, env_id):
    """Caption accuracy of one model on env_id's held-out frames (runs in a child process: see run_probe)."""
    import tiny_vlm
    import vlm

    model, processor = vlm.load_policy(model_id, env_id=env_id)
    return tiny_vlm.caption_accuracy(model, processor, env_id)


def tiny_model_name(env_id):
    """The tiny model that `--model-id tiny` trains on env_id, named with a hash of its weights: a saved result is
    reused only when it was trained from this very model (a re-shipped or rebuilt family has a new name)."""
    import tiny_vlm

    path = Path(tiny_vlm.tiny_model_path(tiny_vlm.family_of(env_id)))
    return f"{path.name}-{hashlib.sha1((path / 'model.safetensors').read_bytes()).hexdigest()[:10]}"


def child_env():
    """One thread per torch process: --jobs processes with several threads each oversubscribe the cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_probe(model_id, env_id):
    """probe() in a one-thread child process: it takes the run's slot, and the parent never imports torch."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.ablations", "--probe", str(model_id), env_id],
                         env=child_env(), capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def read_charts(run_dir, start):
    """Per iteration that finished episodes, from the TensorBoard event file: env steps, success rate,
    episodic return, and seconds since `start` (the run's launch, model loading included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [log_dir] = [p.parent for p in (run_dir / "runs").glob("*/events.out.tfevents.*")]
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    success, returns = events.Scalars("charts/success_rate"), events.Scalars("charts/episodic_return")
    return dict(steps=[p.step for p in success], success=[p.value for p in success],
                returns=[p.value for p in returns], seconds=[round(p.wall_time - start, 1) for p in success])


def run_one(out, env_id, variant, seed, total_timesteps):
    """Train one (env, variant, seed), probe its captions, write result.json; skip if already done."""
    run_dir = out / env_id.split("/")[-1] / variant / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "vldac.py"), "--env-id", env_id, "--seed", str(seed),
           "--exp-name", f"ablation-{variant}", "--total-timesteps", str(total_timesteps), "--save-model",
           "--save-dir", str(run_dir / "model"), "--eval-episodes", "0", *VARIANTS[variant]]
    result_file, model = run_dir / "result.json", tiny_model_name(env_id)
    if result_file.exists():
        done = json.loads(result_file.read_text())
        if done["command"] == cmd and done.get("model") == model:
            return done
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt: start it again
    run_dir.mkdir(parents=True)
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(cmd, cwd=run_dir, env=child_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"FAILED (exit {code}): {env_id} {variant} seed {seed}, see {run_dir / 'train.log'}", flush=True)
        return None
    wall = time.time() - start
    result = dict(env_id=env_id, variant=variant, seed=seed, command=cmd, model=model, wall_s=round(wall, 1),
                  **read_charts(run_dir, start), caption_after=run_probe(run_dir / "model", env_id))
    result_file.write_text(json.dumps(result, indent=1))
    print(f"done: {env_id} {variant} seed {seed} in {wall:.0f} s", flush=True)
    return result


def moving_average(x, window=3):
    """Trailing moving average: entry i is the mean of x[i - window + 1 .. i] (from the window-th point on)."""
    return [sum(x[i - window + 1 : i + 1]) / window for i in range(window - 1, len(x))]


def mean_std(values):
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def table(results, envs, variants, targets, caption_before):
    """One markdown row per (env, variant), aggregated over the seeds that finished; caption_before: {env id: the
    base model's caption accuracy}."""
    rows = ["| env | variant | seeds | final success | peak success | env steps to target | caption acc "
            "before -> after | training wall per run |", "|" + "---|" * 8]
    for env_id in envs:
        target = targets.get(env_id)
        for variant in variants:
            runs = [r for r in results if r["env_id"] == env_id and r["variant"] == variant]
            final = [statistics.mean(r["success"][-4:]) for r in runs if r["success"]]
            peak = [max(moving_average(r["success"]) or r["success"]) for r in runs if r["success"]]
            reach_cell = "no target"
            if target is not None:  # env steps of the first iteration whose moving average reaches the target
                reached = [next((r["steps"][i + 2] for i, m in enumerate(moving_average(r["success"])) if m >= target),
                                None) for r in runs]
                hits = [s for s in reached if s is not None]
                where = f"{statistics.mean(hits):,.0f}" if hits else "never"
                reach_cell = f">= {target}: {where} ({len(hits)}/{len(runs)} reached)"
            after = [r["caption_after"] for r in runs]
            caption = f"{caption_before[env_id]:.3f} -> {statistics.mean(after):.3f}" if after else "-"
            wall = f"{statistics.mean(r['wall_s'] for r in runs):.0f} s" if runs else "-"
            rows.append(f"| {env_id.split('/')[-1]} | {variant} | {len(runs)} | {mean_std(final)} | {mean_std(peak)} "
                        f"| {reach_cell} | {caption} | {wall} |")
    return "\n".join(rows)


def learning_curve(runs, points=60):
    """(env steps (points,), mean (points,), std (points,)) over runs of each run's 3-iteration moving average of
    the success rate, interpolated onto a grid up to the shortest run's last step (flat before its first point)."""
    import numpy as np

    grid = np.linspace(0, min(r["steps"][-1] for r in runs), points)
    curves = np.array([np.interp(grid, r["steps"][2:], moving_average(r["success"])) for r in runs])
    return grid, curves.mean(0), curves.std(0)


def plot(results, env_id, variants, path, target=None):
    """One PNG per env: success rate against env steps, one line per variant, the mean over seeds of each seed's
    3-iteration moving average (interpolated onto a common grid of env steps) with a +- std band."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in variants:
        runs = [r for r in results if r["env_id"] == env_id and r["variant"] == variant and len(r["success"]) >= 3]
        if not runs:
            continue
        grid, mean, std = learning_curve(runs)
        (line,) = ax.plot(grid, mean, lw=1.5, label=f"{variant} ({len(runs)} seeds)")
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set(xlabel="env steps", ylabel="success rate (3-iteration mean)", ylim=(0, 1.02), title=env_id)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def base_captions(out, env_ids):
    """{env id: the base tiny model's caption accuracy}, each measured once and kept in OUT/caption_base.json."""
    base_file = out / "caption_base.json"
    known = json.loads(base_file.read_text()) if base_file.exists() else {}
    known.pop("caption_before", None)  # an older version kept one NumberLine figure under this key
    for env_id in env_ids:
        if env_id not in known:
            known[env_id] = run_probe("tiny", env_id)
            base_file.write_text(json.dumps(known, indent=1))
    return known


def hardware():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.platform()}, Python {platform.python_version()}"


def main():
    parser = argparse.ArgumentParser(description="Ablations on the tiny model: variants x envs x seeds of vldac.py, "
                                     "then a markdown table (see the module docstring).")
    parser.add_argument("--variants", nargs="+", default=PAPER_VARIANTS, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"any of: {' '.join(VARIANTS)} (default: all but {' '.join(DIAGNOSTICS)})")
    parser.add_argument("--envs", nargs="+", default=["gym_cards/NumberLine-v0", "gym_cards/EZPoints-v0"],
                        help="env ids (default: NumberLine and EZPoints)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="(default: 1 2 3)")
    parser.add_argument("--total-timesteps", type=int, default=4096, help="env steps per run (default: 4096; the "
                        "tiny defaults give 16 envs x 8 steps = 128 per iteration)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="runs in parallel, one thread each (default: the number of cores)")
    parser.add_argument("--target", action="append", default=[], metavar="ENV=SUCCESS",
                        help=f"success rate for 'env steps to target' (repeatable; default: {DEFAULT_TARGETS})")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations", help="(default: runs/ablations)")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL ENV -> caption accuracy
    args = parser.parse_args()
    if args.probe:
        print(probe(*args.probe))
        return
    targets = {**DEFAULT_TARGETS, **{k: float(v) for k, v in (t.split("=", 1) for t in args.target)}}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    caption_before = base_captions(out, args.envs)
    todo = [(env_id, variant, seed) for env_id in args.envs for variant in args.variants for seed in args.seeds]
    print(f"{len(todo)} runs of {args.total_timesteps} env steps, {args.jobs} at a time, in {out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(lambda job: run_one(out, *job, args.total_timesteps), todo) if r]
    wall = time.time() - start

    report = "\n".join([
        f"# Ablations: tiny model, {args.total_timesteps} env steps per run, seeds {' '.join(map(str, args.seeds))}",
        "",
        table(results, args.envs, args.variants, targets, caption_before),
        "",
        "final: mean success rate of the last 4 iterations; peak: maximum of the 3-iteration moving average; "
        "both mean +- std over seeds. Env steps to target: the first iteration whose 3-iteration moving average "
        "(with the two before it) reaches the target, mean over the seeds that reached it. Caption accuracy: "
        "held-out frames of the run's env, base model -> mean over trained models.",
        "",
        f"{len(results)}/{len(todo)} runs finished. Wall time {wall:.0f} s for this invocation (runs done earlier "
        f"were reused), {sum(r['wall_s'] for r in results):.0f} s summed over runs; {args.jobs} runs at a time, "
        "OMP_NUM_THREADS=1 each.",
        f"Hardware: {hardware()}.",
        f"Command: python -m benchmarks.ablations {' '.join(sys.argv[1:])}",
    ])
    figures = [plot(results, env_id, args.variants, out / f"{env_id.split('/')[-1]}.png", targets.get(env_id))
               for env_id in args.envs]
    report += "\n\nFigures: " + ", ".join(str(f) for f in figures)
    (out / "results.md").write_text(report + "\n")
    print(report)
    print(f"\nwritten to {out / 'results.md'}")


if __name__ == "__main__":
    main()
