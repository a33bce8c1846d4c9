"""Ablations on the tiny model: VL-DAC against RL4VLM (its policy loss with VL-DAC's stabilisers, as published,
and the ladder in between) and LOOP, and VL-DAC without each of its stabilisers. Runs variants x envs x seeds of
`python vldac.py` (or, with --grid paper, the paper's comparison in miniature: GRIDS), --jobs at a time with one
thread each, then writes a markdown table to OUT/results.md and a learning-curve PNG per env to OUT/ENV.png (mean
over seeds, +- standard error band, one line per variant), and prints it. Run:
    python -m benchmarks.ablations                                          # the full benchmark
    python -m benchmarks.ablations --total-timesteps 256 --seeds 1 --variants vldac rl4vlm-0.5 --out /tmp/abl
    python -m benchmarks.ablations --grid paper --jobs 2 --max-minutes 600 --transfer --figures docs/ablations
Resumable: a run whose result.json was written by the same command is skipped, and a run cut off before it finished
continues from its last checkpoint (run_one), so an interrupted benchmark continues where it stopped;
--max-minutes M starts no new run (nor transfer evaluation) after M minutes, then reports every result on disk for
the selected cells and how many runs remain. Each run lives in
OUT/{env}/{variant}/seed{S}/: train.log (stdout), runs/ (TensorBoard and checkpoint; vldac.py runs with that
directory as its working directory), model/, attempt.json while unfinished, then result.json (and transfer_*.json
with --transfer).
--archive DIR keeps what a finished run leaves that is small (result.json, transfer_*.json, the base model's caption
and transfer files) in DIR as well, with this machine's paths written as {out}, {root}, {python}, and copies it back
into OUT before anything runs: commit DIR, and a run finished on any machine is never redone (only its model, which
stays in OUT, is not kept: a transfer evaluation not yet made of such a run cannot be made).

Per env and variant, over seeds (mean +- standard error), from `charts/success_rate` per iteration weighted by the
number of episodes that ended in it (train.log's `(N episodes)`: MiniWorld ends one or two episodes per iteration,
so a plain average over iterations would weigh one episode as much as sixteen):
- final success: over the episodes that ended in the last 4 iterations;
- peak success: the maximum of the smoothed curve (smoothed(): the trailing 3 iterations, widened back until they
  hold MIN_EPISODES episodes);
- last quarter: over the episodes that ended in the last quarter of the run's env steps;
- env steps to target: the first iteration whose smoothed success reaches --target, as env steps; mean over the
  seeds that reached it, and how many did;
- caption accuracy on the run's env (tiny_vlm.caption_accuracy) of the base model and of each trained model:
  does RL degrade image understanding?
- cost: minutes per run (training, model loading included) and env steps/s (--total-timesteps / that wall time).
With --grid, VL-DAC against each baseline run for run (COMPARISONS; on MiniWorld both rooms together, then each): in
how many (VL-DAC run, baseline run) pairs of the same env VL-DAC ends higher, in last-quarter success and in caption
accuracy, with an exact one-sided p.
--transfer: every model trained on TRANSFER_FROM, and the base model, played with no further training on
TRANSFER_ENVS (`python evaluate.py`, 50 episodes per env), sampled at temperature 1 as in training (with the caption
probe) and greedily, cached in the run's transfer_sampled.json and transfer_greedy.json. Both, because the weak
prior is a mixture (the expert's action with probability q, else a random one) whose most likely action is the
expert's: greedy decoding plays the base model close to the expert, sampling plays the prior RL starts from.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
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
# the paper's comparison in miniature: (env, variant) cells in priority order (runs start in this order)
ROOMS = ("MiniWorld-OneRoom-v0", "MiniWorld-Hallway-v0")
GRIDS = {"paper": [
    *[(env, v) for env in ROOMS for v in ("vldac", "rl4vlm-published-0.35", "rl4vlm-published-0.5", "loop")],
    *[("gym_cards/EZPoints-v0", v) for v in ("vldac", "rl4vlm-published-0.35", "loop")],
    *[("MiniWorld-OneRoom-v0", v) for v in ("rl4vlm-0.5+warmup", "rl4vlm-0.5+warmup+stopgrad", "rl4vlm-0.5",
                                            "vldac-no-warmup", "vldac-no-stopgrad", "vldac-no-kl")],
]}
# the grid's claims, run for run: (VL-DAC against what, its variants pooled as one baseline, on which envs); on
# MiniWorld both rooms together, then each
RL4VLM_PUBLISHED = ("RL4VLM as published (both lambdas)", ("rl4vlm-published-0.35", "rl4vlm-published-0.5"))
COMPARISONS = {"paper": [
    *[(*baseline, envs) for baseline in (RL4VLM_PUBLISHED, ("LOOP", ("loop",)))
      for envs in (ROOMS, ROOMS[:1], ROOMS[1:])],
    ("RL4VLM as published (lambda 0.35)", ("rl4vlm-published-0.35",), ("gym_cards/EZPoints-v0",)),
    ("LOOP", ("loop",), ("gym_cards/EZPoints-v0",)),
]}
GRID_STEPS, GRID_TARGET = 16_384, 0.9  # every cell the same env-step budget; target for every env of a grid
# --transfer: models trained on TRANSFER_FROM play these with no further training, at each decoding temperature
TRANSFER_FROM = "MiniWorld-OneRoom-v0"
TRANSFER_ENVS = ["MiniWorld-Hallway-v0", "MiniWorld-FourRooms-v0", "MiniWorld-WallGap-v0"]
TRANSFER_DECODING = {"sampled": 1.0, "greedy": 0.0}  # name -> evaluate.py --temperature; the caption probe once
# smoothed(): a window of fewer episodes says little (a MiniWorld iteration ends one or two); 16 = one per env
MIN_EPISODES = 16


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


def read_charts(run_dir, segments):
    """Per iteration that finished episodes, from the TensorBoard event file: env steps, success rate,
    episodic return, and seconds of the run's own time (model loading included): segments are the run's launches,
    [wall clock, seconds spent before it], one per resumption."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [log_dir] = {p.parent for p in (run_dir / "runs").glob("*/events.out.tfevents.*")}  # a file per launch
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    logged = events.Tags()["scalars"]
    scalars = lambda tag: events.Scalars(tag) if tag in logged else []  # a run that ended no episode logs none
    success, returns = scalars("charts/success_rate"), scalars("charts/episodic_return")
    return dict(steps=[p.step for p in success], success=[p.value for p in success],
                returns=[p.value for p in returns], seconds=[round(elapsed(segments, p.wall_time), 1) for p in success])


def elapsed(segments, wall_time):
    """Seconds of a run's own time at wall_time: into the launch that logged it, plus what the run spent before
    that launch (a resumed run's gaps between launches do not count)."""
    started, before = max((seg for seg in segments if seg[0] <= wall_time), default=segments[0])  # latest launch
    return before + wall_time - started


def run_paths(out, env_id, variant, seed, total_timesteps):
    """(run directory, vldac.py command) of one (env, variant, seed)."""
    run_dir = out / env_id.split("/")[-1] / variant / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "vldac.py"), "--env-id", env_id, "--seed", str(seed),
           "--exp-name", f"ablation-{variant}", "--total-timesteps", str(total_timesteps), "--save-model",
           "--save-dir", str(run_dir / "model"), "--eval-episodes", "0", *VARIANTS[variant]]
    return run_dir, cmd


def finished(out, env_id, variant, seed, total_timesteps):
    """The saved result of a run made by this very command from this very tiny model, else None."""
    run_dir, cmd = run_paths(out, env_id, variant, seed, total_timesteps)
    if not (run_dir / "result.json").exists():
        return None
    done = json.loads((run_dir / "result.json").read_text())
    if done["command"] != cmd or done.get("model") != tiny_model_name(env_id):
        return None
    if "episodes" not in done:  # a result written before episodes were kept: count them from its log
        done["episodes"] = episode_counts(run_dir, done["steps"])
    return done


def run_one(out, env_id, variant, seed, total_timesteps, deadline=None):
    """Train one (env, variant, seed), probe its captions, write result.json; skip if already done. Past the
    deadline (time.time()) a run not yet done is not started: None. A run cut off earlier (Ctrl-C, kill, end of a
    session) by the same command continues from its last checkpoint (vldac.py --resume): its iterations after that
    checkpoint are redone, and MiniWorld, whose envs cannot be saved, starts new episodes there. Its cost, wall_s,
    is the time each launch spent up to its last checkpoint, plus the last launch whole."""
    done = finished(out, env_id, variant, seed, total_timesteps)
    if done or (deadline is not None and time.time() > deadline):
        return done
    run_dir, cmd = run_paths(out, env_id, variant, seed, total_timesteps)
    model = tiny_model_name(env_id)
    attempt = run_dir / "attempt.json"  # command, tiny model and launches of a run not yet finished
    earlier = json.loads(attempt.read_text()) if attempt.exists() else {}
    saved = sorted((run_dir / "runs").glob("*/checkpoint.pt"))
    if saved and earlier.get("command") == cmd and earlier.get("model") == model:
        segments, (started, before) = earlier["segments"], earlier["segments"][-1]
        spent = before + saved[0].stat().st_mtime - started  # work after the checkpoint is lost: not counted
        resume = str(saved[0].parent.relative_to(run_dir))  # runs/{run_name}, relative to the run's working directory
        launch, mode = [sys.executable, str(ROOT / "vldac.py"), "--resume", resume], "a"
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a different or checkpoint-less earlier attempt: start again
        run_dir.mkdir(parents=True)
        segments, spent, launch, mode = [], 0.0, cmd, "w"
    start = time.time()
    segments.append([start, spent])
    attempt.write_text(json.dumps(dict(command=cmd, model=model, segments=segments)))
    with open(run_dir / "train.log", mode) as log:
        if mode == "a":
            print(f"=== resumed from {saved[0]} ({spent:.0f} s spent before)", file=log, flush=True)
        code = subprocess.run(launch, cwd=run_dir, env=child_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"FAILED (exit {code}): {env_id} {variant} seed {seed}, see {run_dir / 'train.log'}", flush=True)
        return None
    wall = spent + time.time() - start
    charts = read_charts(run_dir, segments)
    result = dict(env_id=env_id, variant=variant, seed=seed, command=cmd, model=model,
                  wall_s=round(wall, 1), launches=len(segments), **charts,
                  episodes=episode_counts(run_dir, charts["steps"]), caption_after=run_probe(run_dir / "model", env_id))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    attempt.unlink()
    launches = f" ({len(segments)} launches)" if len(segments) > 1 else ""
    print(f"done: {env_id} {variant} seed {seed} in {wall:.0f} s{launches}", flush=True)
    return result


def logged_iterations(run_dir):
    """{env steps: (success rate, episodes that ended)} per iteration of vldac.py's stdout (`... success X return Y
    (N episodes) ...`; X is nan where none ended); {} without a log. A resumed run's log repeats the iterations
    after its last checkpoint: the last line of each env step wins."""
    log = run_dir / "train.log"
    line = re.compile(r"steps (\d+) SPS \S+ \| success (\S+) return \S+ \((\d+) episodes\)")
    return {int(m[1]): (float(m[2]), int(m[3])) for m in line.finditer(log.read_text())} if log.exists() else {}


def episode_counts(run_dir, steps):
    """Episodes that ended in each iteration of `steps` (env steps), from vldac.py's stdout; None without a log."""
    if not (run_dir / "train.log").exists():
        return None
    counts = logged_iterations(run_dir)
    return [counts[step][1] if step in counts else 0 for step in steps]


def weights(run):
    """Episodes per logged iteration; one each for a run without counts (every iteration weighs the same)."""
    return run.get("episodes") or [1] * len(run["success"])


def pooled(run, first, last):
    """(successes, episodes) over iterations first..last-1 (successes fractional for a run without counts)."""
    counts = weights(run)[first:last]
    return sum(s * n for s, n in zip(run["success"][first:last], counts)), sum(counts)


def smoothed(run, window=3, min_episodes=MIN_EPISODES):
    """Per logged iteration (None where undefined): the success over the episodes that ended in the trailing
    `window` iterations (all of them in a shorter run), widened back until they hold min_episodes (None while fewer
    have ended since the start). A run without episode counts: the plain moving average over `window` iterations."""
    counts, window = run.get("episodes"), min(window, len(run["success"]))
    need = min_episodes if counts else 1
    curve = []
    for i in range(len(run["success"])):
        first = i - window + 1
        while counts and first > 0 and pooled(run, first, i + 1)[1] < need:
            first -= 1
        wins, episodes = pooled(run, max(first, 0), i + 1)
        curve.append(wins / episodes if first >= 0 and episodes >= need else None)
    return curve


def run_steps(run):
    """The run's env-step budget (--total-timesteps)."""
    return int(run["command"][run["command"].index("--total-timesteps") + 1])


def last_quarter(run):
    """(successes, episodes) that ended in the last quarter of the run's env steps; successes rounded to whole
    episodes (the logged rate times the count)."""
    keep = [i for i, step in enumerate(run["steps"]) if step > run_steps(run) * 3 / 4]
    if not keep:
        return 0, 0
    wins, episodes = pooled(run, keep[0], keep[-1] + 1)
    return round(wins) if run.get("episodes") else wins, episodes


def steps_to(run, target):
    """Env steps of the first iteration whose smoothed success reaches target; None if none does."""
    return next((step for step, m in zip(run["steps"], smoothed(run)) if m is not None and m >= target), None)


def moving_average(x, window=3):
    """Trailing moving average: entry i is the mean of x[i - window + 1 .. i] (from the window-th point on)."""
    return [sum(x[i - window + 1 : i + 1]) / window for i in range(window - 1, len(x))]


def mean_se(values, digits=2):
    """'mean +- standard error' over seeds (the sample std / sqrt(n)); one seed: its value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    se = statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.mean(values):.{digits}f} +- {se:.{digits}f}"


def each(values, digits=2):
    """Each seed's value, 'a b c', to print beside a mean over seeds."""
    return " ".join(f"{v:.{digits}f}" for v in values)


def cell(results, env_id, variant):
    """The finished runs of one (env, variant), by seed."""
    runs = [r for r in results if r["env_id"] == env_id and r["variant"] == variant]
    return sorted(runs, key=lambda r: r.get("seed", 0))


def table(results, cells, targets, caption_before):
    """One markdown row per (env, variant) cell, aggregated over the seeds that finished; caption_before: {env id:
    the base model's caption accuracy}."""
    rows = ["| env | variant | seeds | final success | peak success | last quarter: success (each seed's; episodes) | "
            "env steps to target | caption acc before -> after (each seed's) | minutes per run | env steps/s |",
            "|" + "---|" * 10]
    for env_id, variant in cells:
        runs, target = cell(results, env_id, variant), targets.get(env_id)
        final = [w / n for w, n in (pooled(r, max(len(r["success"]) - 4, 0), len(r["success"])) for r in runs) if n]
        peak = [max(m for m in smoothed(r) if m is not None) for r in runs if any(m is not None for m in smoothed(r))]
        quarters = [last_quarter(r) for r in runs]
        episodes = sum(n for _, n in quarters) if all(r.get("episodes") for r in runs) else "-"
        rates = [w / n for w, n in quarters if n]
        seeds = f"{each(rates)}; " if len(rates) > 1 else ""  # one seed: the mean is its rate
        quarter = f"{mean_se(rates)} ({seeds}{episodes})" if rates else "-"
        reach = "no target"
        if target is not None:
            hits = [s for s in (steps_to(r, target) for r in runs) if s is not None]
            where = f"{statistics.mean(hits):,.0f}" if hits else "never"
            reach = f">= {target}: {where} ({len(hits)}/{len(runs)} reached)"
        after = [r["caption_after"] for r in runs]
        caption = f"{caption_before[env_id]:.3f} -> {statistics.mean(after):.3f}" if after else "-"
        caption += f" ({each(after, 3)})" if len(after) > 1 else ""
        minutes = f"{statistics.mean(r['wall_s'] / 60 for r in runs):.1f}" if runs else "-"
        sps = f"{statistics.mean(run_steps(r) / r['wall_s'] for r in runs):.1f}" if runs else "-"
        rows.append(f"| {env_id.split('/')[-1]} | {variant} | {len(runs)} | {mean_se(final)} | {mean_se(peak)} "
                    f"| {quarter} | {reach} | {caption} | {minutes} | {sps} |")
    return "\n".join(rows)


def pairs_won(ours, theirs):
    """(pairs won, pairs): over envs ({env: [one value per run]} each), every run of ours against every run of
    theirs in the same env; ours wins a pair with the higher value, half a pair on a tie."""
    won = sum((a > b) + (a == b) / 2 for env in ours for a in ours[env] for b in theirs.get(env, []))
    return won, sum(len(ours[env]) * len(theirs.get(env, [])) for env in ours)


def permutation_p(ours, theirs):
    """One-sided exact p of pairs_won, a Mann-Whitney test stratified by env: the share of all relabellings of each
    env's runs (as many ours as before) that win at least as many pairs. Counts every relabelling: small grids only."""
    from itertools import combinations

    ways = {0.0: 1}  # pairs won -> relabellings, env by env
    for env, mine in ours.items():
        both = mine + theirs.get(env, [])
        here = {}
        for pick in combinations(range(len(both)), len(mine)):
            rest = [both[i] for i in range(len(both)) if i not in pick]
            won = pairs_won({env: [both[i] for i in pick]}, {env: rest})[0]
            here[won] = here.get(won, 0) + 1
        total = {}
        for w, n in ways.items():
            for x, m in here.items():
                total[w + x] = total.get(w + x, 0) + n * m
        ways = total
    observed = pairs_won(ours, theirs)[0]
    return sum(n for w, n in ways.items() if w >= observed) / sum(ways.values())


def quarter_rate(run):
    """The run's success over the episodes that ended in the last quarter of its env steps (0 if none ended)."""
    wins, episodes = last_quarter(run)
    return wins / episodes if episodes else 0.0


def comparison_table(results, comparisons):
    """VL-DAC against each baseline run for run, in the same env: the pairs in which its last-quarter success and
    its caption accuracy after RL are the higher, with permutation_p."""
    rows = ["| VL-DAC against | envs | runs (VL-DAC / baseline) | last-quarter success: pairs VL-DAC higher | p "
            "| caption acc after: pairs VL-DAC higher | p |", "|" + "---|" * 7]
    for label, variants, envs in comparisons:
        ours = {env: cell(results, env, "vldac") for env in envs}
        theirs = {env: [r for v in variants for r in cell(results, env, v)] for env in envs}
        row = (f"| {label} | {', '.join(e.split('/')[-1] for e in envs)} | {sum(map(len, ours.values()))} / "
               f"{sum(map(len, theirs.values()))} |")
        for value in (quarter_rate, lambda run: run["caption_after"]):
            mine = {env: [value(r) for r in runs] for env, runs in ours.items()}
            other = {env: [value(r) for r in runs] for env, runs in theirs.items()}
            won, pairs = pairs_won(mine, other)
            row += f" {won:g} of {pairs} | {permutation_p(mine, other):.2g} |" if pairs else " - | - |"
        rows.append(row)
    return "\n".join(rows)


def learning_curve(runs, points=60):
    """(env steps (points,), mean (points,), standard error (points,)) over runs of each run's smoothed success
    rate, interpolated onto a grid up to the shortest run's last step (flat before its first point)."""
    import numpy as np

    curves = [[(step, m) for step, m in zip(r["steps"], smoothed(r)) if m is not None] for r in runs]
    grid = np.linspace(0, min(c[-1][0] for c in curves), points)
    curves = np.array([np.interp(grid, *zip(*c)) for c in curves])
    se = curves.std(0, ddof=1) / len(runs) ** 0.5 if len(runs) > 1 else np.zeros(points)
    return grid, curves.mean(0), se


def plot(results, env_id, variants, path, target=None):
    """One PNG per env: success rate against env steps, one line per variant, the mean over seeds of each seed's
    smoothed success (interpolated onto a common grid of env steps) with a +- standard error band."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in variants:
        runs = [r for r in cell(results, env_id, variant) if any(m is not None for m in smoothed(r))]
        if not runs:
            continue
        grid, mean, se = learning_curve(runs)
        (line,) = ax.plot(grid, mean, lw=1.5, label=f"{variant} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        ax.fill_between(grid, mean - se, mean + se, color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set(xlabel="env steps", ylabel=f"success (trailing 3+ iterations, >= {MIN_EPISODES} episodes)",
           ylim=(0, 1.02), title=env_id)
    if ax.get_legend_handles_labels()[0]:  # none while no variant has a point
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --archive: the files kept, relative to OUT (a run's model, log and TensorBoard stay in OUT)
KEPT = ("caption_base.json", "transfer/*.json", "*/*/seed*/result.json", "*/*/seed*/transfer_*.json")
_archive_lock = threading.Lock()  # --jobs threads finish runs at once


def portable(text, out, to_archive):
    """A kept file's text with this machine's paths (OUT, the repository, the Python) written as placeholders
    (to_archive), or the placeholders written as this machine's paths; the longest path first, as one may hold
    another (OUT inside the repository)."""
    paths = sorted([(str(out), "{out}"), (str(ROOT), "{root}"), (sys.executable, "{python}")], key=lambda p: -len(p[0]))
    for here, there in paths:
        text = text.replace(here, there) if to_archive else text.replace(there, here)
    return text


def write_atomic(path, text):
    """Write whole or not at all (another invocation may read it at the same time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sync_archive(out, archive, to_archive):
    """--archive: copy the KEPT files from OUT to the archive (to_archive), or those OUT lacks from the archive to
    OUT; returns how many files were copied."""
    source, target = (out, archive) if to_archive else (archive, out)
    copied = 0
    with _archive_lock:
        for pattern in KEPT:
            for path in sorted(source.glob(pattern)):
                text = portable(path.read_text(), out, to_archive)
                dest = target / path.relative_to(source)
                if dest.exists() and (not to_archive or dest.read_text() == text):
                    continue  # restoring never replaces a file of OUT's own; archiving writes only what changed
                write_atomic(dest, text)
                copied += 1
    return copied


def archiving(work, out, archive):
    """work(job), and with --archive the KEPT files archived as each job returns: a session may end before the
    others finish."""

    def work_and_keep(job):
        value = work(job)
        if archive:
            sync_archive(out, archive, to_archive=True)
        return value

    return work_and_keep


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


def transfer_records(path, env_ids, episodes, temperature):
    """{env id: evaluate.py's record} of a finished transfer file, else None (missing, another number of episodes or
    temperature, or an interrupted evaluation: evaluate.py writes each row as it finishes)."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    records = {r["env_id"]: r for r in saved["records"] if r["num_episodes"] == episodes}
    ok = saved.get("temperature") == temperature and all(env_id in records for env_id in env_ids)
    return records if ok else None


def run_transfer(model, path, episodes, temperature, deadline=None):
    """evaluate.py on TRANSFER_ENVS for one model at one temperature (the caption probe only when sampling, the first
    decoding) in a one-thread child, its JSON at `path` (the cache); None past the deadline, or if it failed."""
    done = transfer_records(path, TRANSFER_ENVS, episodes, temperature)
    if done or (deadline is not None and time.time() > deadline) or model != "tiny" and not Path(model).exists():
        return done  # None for a run restored from --archive whose model stayed on another machine
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model-ids", str(model), "--env-ids", *TRANSFER_ENVS,
           "--num-episodes", str(episodes), "--temperature", str(temperature), "--output", str(path)]
    if temperature == 0:
        cmd += ["--caption-probe", "False"]
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(path.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"FAILED (exit {code}): transfer of {model}, see {path.with_suffix('.log')}", flush=True)
        return None
    print(f"done: transfer of {model} at temperature {temperature:g} in {time.time() - start:.0f} s", flush=True)
    return transfer_records(path, TRANSFER_ENVS, episodes, temperature)


def transfer_table(base, trained, episodes):
    """Markdown: per variant (the base model first) and env, success over seeds at each decoding, caption
    accuracy vs the base model's and the share of unparsable sampled answers; base: {decoding: {env: record} or
    None}, trained: {variant: [that, per seed]}. A decoding not yet evaluated for some seed counts only the seeds that
    have it (the seeds column says how many)."""
    from evaluate import wilson_interval

    def success(per_seed, decoding, env_id):  # "mean (each seed's) | wins / episodes [Wilson]"
        done = [seed[decoding][env_id] for seed in per_seed if seed[decoding]]
        if not done:
            return "- | -"
        rates = [record["success_rate"] for record in done]
        wins = sum(e["success"] for record in done for e in record["episodes"])
        low, high = wilson_interval(wins, episodes * len(done))
        return (f"{mean_se(rates)} ({each(rates)}) | {wins} / {episodes * len(done)} "
                f"[{low:.2f}, {high:.2f}]")

    def caption(per_seed, env_id):  # mean over the seeds whose sampled evaluation ran the probe
        accs = [seed["sampled"][env_id]["caption_accuracy"] for seed in per_seed if seed["sampled"]]
        return "-" if not accs or None in accs else f"{statistics.mean(accs):.3f}"

    def unparsable(per_seed, env_id):  # share of answers that did not parse (a random action played), sampled
        rates = [seed["sampled"][env_id]["parse_failure_rate"] for seed in per_seed if seed["sampled"]]
        return f"{statistics.mean(rates):.2f}" if rates else "-"

    header = " | ".join(f"{d}: mean over seeds (each seed's) | {d}: pooled [95% Wilson]" for d in TRANSFER_DECODING)
    rows = [f"| model | env | seeds ({' / '.join(TRANSFER_DECODING)}) | {header} | caption acc after (base) | "
            "unparsable answers, sampled |", "|" + "---|" * (5 + 2 * len(TRANSFER_DECODING))]
    for variant, per_seed in [("tiny (base, no RL)", [base]), *trained.items()]:
        for env_id in TRANSFER_ENVS:
            seeds = " / ".join(str(sum(bool(seed[d]) for seed in per_seed)) for d in TRANSFER_DECODING)
            cells = " | ".join(success(per_seed, d, env_id) for d in TRANSFER_DECODING)
            rows.append(f"| {variant} | {env_id.split('-')[1]} | {seeds} | {cells} | {caption(per_seed, env_id)} "
                        f"({caption([base], env_id)}) | {unparsable(per_seed, env_id)} |")
    return "\n".join(rows)


def transfer(out, cells, seeds, total_timesteps, episodes, jobs, deadline, archive=None):
    """--transfer: every finished model of a TRANSFER_FROM cell and the base model on TRANSFER_ENVS at each decoding
    (cached; every model sampled first); returns (markdown, evaluations still to do, how many of those cannot be
    done here: their run was restored from --archive without its model)."""
    variants = [v for env_id, v in cells if env_id == TRANSFER_FROM]
    models = [(v, s, run_paths(out, TRANSFER_FROM, v, s, total_timesteps)[0]) for v in variants for s in seeds
              if finished(out, TRANSFER_FROM, v, s, total_timesteps)]
    # (model, cache stem): the decoding's name completes it, STEM_sampled.json
    evaluated = [("tiny", out / "transfer" / tiny_model_name(TRANSFER_FROM)),
                 *[(run_dir / "model", run_dir / "transfer") for _, _, run_dir in models]]
    todo = [(model, stem.with_name(f"{stem.name}_{d}.json"), episodes, t) for d, t in TRANSFER_DECODING.items()
            for model, stem in evaluated]
    print(f"transfer: {len(evaluated)} models on {' '.join(TRANSFER_ENVS)}, {episodes} episodes each, "
          f"{' and '.join(TRANSFER_DECODING)}", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(archiving(lambda job: run_transfer(*job, deadline), out, archive), todo))
    per_model = [dict(zip(TRANSFER_DECODING, done[i::len(evaluated)])) for i in range(len(evaluated))]
    trained = {v: [] for v in variants}
    for (variant, _, _), records in zip(models, per_model[1:]):
        trained[variant].append(records)
    missing = sum(r is None for r in done) + len(TRANSFER_DECODING) * (len(variants) * len(seeds) - len(models))
    lost = sum(r is None and not Path(job[0]).exists() for r, job in zip(done, todo) if job[0] != "tiny")
    return transfer_table(per_model[0], trained, episodes), missing, lost


def main():
    parser = argparse.ArgumentParser(description="Ablations on the tiny model: variants x envs x seeds of vldac.py, "
                                     "then a markdown table (see the module docstring).")
    parser.add_argument("--grid", choices=list(GRIDS), help="run a fixed list of (env, variant) cells in priority "
                        "order instead of --envs x --variants (which, if given, keep only the cells they name): "
                        "`paper`, the paper's comparison in miniature (GRIDS)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help=f"any of: {' '.join(VARIANTS)} (default: all but {' '.join(DIAGNOSTICS)})")
    parser.add_argument("--envs", nargs="+", help="env ids (default: NumberLine and EZPoints)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="(default: 1 2 3)")
    parser.add_argument("--total-timesteps", type=int, help="env steps per run (default: 4096, with --grid "
                        f"{GRID_STEPS}; the tiny defaults give 16 envs x 8 steps = 128 per iteration)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="runs in parallel, one thread each (default: the number of cores)")
    parser.add_argument("--target", action="append", default=[], metavar="ENV=SUCCESS",
                        help=f"success rate for 'env steps to target' (repeatable; default: {DEFAULT_TARGETS}, with "
                        f"--grid {GRID_TARGET} for every env)")
    parser.add_argument("--max-minutes", type=float, help="start no new run (nor transfer evaluation) after this "
                        "many minutes, then report what is on disk; rerun the same command to go on (default: none)")
    parser.add_argument("--transfer", action="store_true", help=f"also play every model trained on {TRANSFER_FROM} "
                        f"and the base model on {' '.join(TRANSFER_ENVS)} with no further training (evaluate.py, "
                        "sampled at temperature 1 and greedy), cached in each run's transfer_*.json")
    parser.add_argument("--figures", type=Path, metavar="DIR", help="also copy the PNGs to DIR (e.g. docs/ablations)")
    parser.add_argument("--out", type=Path, help="(default: runs/ablations, with --grid runs/grid_{GRID}: a grid's "
                        "longer runs must not replace the ablations' runs of the same env and variant)")
    parser.add_argument("--archive", type=Path, metavar="DIR", help="also keep each finished run's small files "
                        "(results, transfer evaluations) in DIR, and restore them from there first: commit DIR and "
                        "no machine redoes a run it holds (e.g. docs/grid/records)")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL ENV -> caption accuracy
    parser.add_argument("--transfer-episodes", type=int, default=50, help=argparse.SUPPRESS)  # testing: cheaper
    args = parser.parse_args()
    if args.probe:
        print(probe(*args.probe))
        return
    if args.grid:  # the grid's cells in its order, kept where --envs / --variants name them
        cells = [(e, v) for e, v in GRIDS[args.grid] if e in (args.envs or [e]) and v in (args.variants or [v])]
        steps, targets = args.total_timesteps or GRID_STEPS, {e: GRID_TARGET for e, _ in cells}
    else:
        envs = args.envs or ["gym_cards/NumberLine-v0", "gym_cards/EZPoints-v0"]
        cells = [(e, v) for e in envs for v in args.variants or PAPER_VARIANTS]
        steps, targets = args.total_timesteps or 4096, dict(DEFAULT_TARGETS)
    if not cells:
        parser.error(f"--envs / --variants leave no cell of --grid {args.grid}")
    targets.update({k: float(v) for k, v in (t.split("=", 1) for t in args.target)})
    env_ids = list(dict.fromkeys(e for e, _ in cells))
    out = (args.out or ROOT / "runs" / (f"grid_{args.grid}" if args.grid else "ablations")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    deadline = start + args.max_minutes * 60 if args.max_minutes is not None else None
    if args.archive:
        restored = sync_archive(out, args.archive, to_archive=False)
        print(f"{restored} files restored from {args.archive}", flush=True)
    caption_before = base_captions(out, env_ids)
    if args.archive:
        sync_archive(out, args.archive, to_archive=True)
    todo = [(env_id, variant, seed) for env_id, variant in cells for seed in args.seeds]  # a cell's seeds together
    print(f"{len(todo)} runs of {steps} env steps, {args.jobs} at a time, in {out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # starts jobs in order: a cell's seeds before the next cell's
        list(pool.map(archiving(lambda job: run_one(out, *job, steps, deadline), out, args.archive), todo))
    transfer_text, transfer_left, transfer_lost = transfer(
        out, cells, args.seeds, steps, args.transfer_episodes, args.jobs, deadline, args.archive,
    ) if args.transfer else (None, 0, 0)
    wall = time.time() - start
    results = [r for r in (finished(out, *job, steps) for job in todo) if r]  # earlier invocations' too

    title = f"The paper's comparison in miniature (--grid {args.grid})" if args.grid else "Ablations"
    report = "\n".join([
        f"# {title}: tiny model, {steps} env steps per run, seeds {' '.join(map(str, args.seeds))}",
        "",
        table(results, cells, targets, caption_before),
        "",
        "Over seeds: mean +- standard error. Success is pooled over the episodes that ended (train.log's count per "
        "iteration): final, in the last 4 iterations; last quarter, in the last quarter of the env steps (each "
        "seed's rate and the total episodes in brackets); peak, the maximum of the smoothed curve (the trailing 3 "
        f"iterations, widened back until they hold {MIN_EPISODES} episodes). Env steps to target: the first "
        "iteration whose smoothed success reaches the target, mean over the seeds that reached it. Caption accuracy: "
        "held-out frames of the run's env, base model -> mean over trained models (each seed's in brackets). Minutes "
        "per run: training, model loading included; env "
        "steps/s: the budget over that time.",
        "",
        f"{len(results)}/{len(todo)} runs finished, {len(todo) - len(results)} remain"
        + (" (rerun the same command to go on)" if len(results) < len(todo) else "")
        + f". Wall time {wall / 60:.1f} min for this invocation (runs done earlier were reused), "
        f"{sum(r['wall_s'] for r in results) / 60:.0f} min summed over runs; {args.jobs} runs at a time, "
        "OMP_NUM_THREADS=1 each.",
        f"Hardware: {hardware()}.",
        f"Command: python -m benchmarks.ablations {' '.join(sys.argv[1:])}",
    ])
    compared = args.grid and any(cell(results, env, "vldac") and any(cell(results, env, v) for v in variants)
                                 for _, variants, envs in COMPARISONS[args.grid] for env in envs)
    if compared:  # not for a report of cells without VL-DAC or without its baselines (the ladder alone)
        report += "\n\n" + "\n".join([
            "## VL-DAC against each baseline, run for run", "",
            comparison_table(results, COMPARISONS[args.grid]), "",
            "Every finished VL-DAC run against every finished run of the baseline in the same env (a baseline's "
            "variants pooled): the pairs in which VL-DAC's value is the higher (a tie counts half), and the "
            "one-sided exact p under the null that a run's variant does not matter within its env (a Mann-Whitney "
            "test stratified by env: the share of the ways to relabel each env's runs that win as many pairs or "
            "more). With 3 seeds per cell, one env and one baseline variant, p cannot go below 0.05 (1 in 20)."])
    if transfer_text is not None:
        report += "\n\n" + "\n".join([
            f"## Transfer: trained on {TRANSFER_FROM}, played on other rooms with no further training", "",
            transfer_text, "",
            f"evaluate.py, {args.transfer_episodes} episodes per model, env and decoding (episode k reset with seed "
            "1 + k: the same episodes for every model): sampled at temperature 1 as in training, and greedy (the "
            "weak prior's most likely action is the expert's, so greedy decoding plays the base model close to the "
            "expert). Success: mean +- standard error over seeds, each seed's rate in brackets; the 95% Wilson "
            "interval is of the count pooled over seeds (it treats the seeds' episodes as one sample). Caption "
            "accuracy on each env's held-out frames, mean over seeds (the base model's in brackets). "
            f"{transfer_left} evaluations (model and decoding) remain"
            + (" (rerun to go on)" if transfer_left > transfer_lost else "")
            + (f"; {transfer_lost} of them cannot be made on this machine: their runs were restored from --archive "
               "without their models" if transfer_lost else "") + "."])
    figures = []
    for env_id in env_ids:
        variants = [v for e, v in cells if e == env_id]
        figures.append(plot(results, env_id, variants, out / f"{env_id.split('/')[-1]}.png", targets.get(env_id)))
        if args.figures:
            args.figures.mkdir(parents=True, exist_ok=True)
            shutil.copy(figures[-1], args.figures / figures[-1].name)
    report += "\n\nFigures: " + ", ".join(str(f) for f in figures)
    if args.figures:
        report += f" (copied to {args.figures})"
    (out / "results.md").write_text(report + "\n")
    print(report)
    print(f"\nwritten to {out / 'results.md'}")


if __name__ == "__main__":
    main()
