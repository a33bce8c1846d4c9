"""Does RL learn on every env with the tiny model? VL-DAC as shipped (`python vldac.py --env-id ENV`, tiny
defaults), env x seed, each run to a fixed env-step budget (BUDGETS: about 30 minutes of one core each).
Writes a markdown table to OUT/learning.md (default docs/learning.md) and prints it. Run:
    python -m benchmarks.learning                                   # every env, seeds 1 2 3 (about 12 h of one core)
    python -m benchmarks.learning --envs MiniWorld-OneRoom-v0 MiniWorld-Hallway-v0 --jobs 2
    python -m benchmarks.learning --envs gym_cards/Blackjack-v0 --seeds 1 --total-timesteps 512 --out /tmp/learn
    python -m benchmarks.learning --envs MiniWorld-OneRoom-v0 --variants vldac-shaped --total-timesteps 6144
Resumable: runs go through benchmarks/ablations.py's run_one (default variant `vldac`; --variants picks others from
its VARIANTS, e.g. `vldac-shaped`, the diagnostic with MiniWorld's reward shaping), so a finished run is never redone
and a run cut off before the end continues from its last checkpoint.

Before RL, per env, from the base tiny model (child processes, one thread each; OUT/base.json):
- caption accuracy on 200 held-out frames (tiny_vlm.caption_accuracy);
- parse failures at temperature 1 on 200 held-out task prompts (tiny_vlm.parse_failure_rate);
- a uniformly random policy's success rate and mean return over 200 episodes (the signal RL starts from);
  MiniWorld also a blind policy that moves forward 90% of the time (else a uniformly random action): what RL can
  reach without looking, so that a gain above it needs the frames.
Blackjack also gets the exact expected return of basic strategy (the best hit/stand decision for every hand,
an infinite deck, these rules) and of the random policy, by recursion over the cards (blackjack_return).
Per run: the success rate over the episodes that ended in each quarter of the env steps (from
the run's stdout); from `charts/success_rate` and `charts/episodic_return` per iteration: the peak of the
3-iteration moving average, the env steps and minutes (since launch, model loading included) at which that
average first reaches the env's target, and the mean return over the last quarter of the run.
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.ablations import (
    ROOT,
    VARIANTS,
    child_env,
    hardware,
    logged_iterations,
    moving_average,
    run_one,
    tiny_model_name,
)

# env steps per run: about 30 minutes of one core at the tiny model's speed on each env (measured SPS x 1800 s)
BUDGETS = {
    "gym_cards/NumberLine-v0": 12_288,
    "gym_cards/EZPoints-v0": 24_576,
    "gym_cards/Points24-v0": 24_576,
    "gym_cards/Blackjack-v0": 24_576,
    "MiniWorld-OneRoom-v0": 16_384,
    "MiniWorld-Hallway-v0": 16_384,
    "MiniWorld-FourRooms-v0": 16_384,
    "MiniWorld-WallGap-v0": 16_384,
}
TARGETS = {"MiniWorld-OneRoom-v0": 0.9, "MiniWorld-Hallway-v0": 0.9, "gym_cards/EZPoints-v0": 0.8,
           "gym_cards/NumberLine-v0": 0.9}
CARDS = [(v, (4 if v == 10 else 1) / 13) for v in range(1, 11)]  # infinite deck: J, Q, K count 10


# ---------------------------------------------------------------- Blackjack, exactly (gymnasium's rules)
def _total(hard, ace):  # an ace counts 11 when that does not bust
    return hard + 10 if ace and hard + 10 <= 21 else hard


@functools.lru_cache(maxsize=None)
def _dealer_final(hard, ace):
    """{final total (22 = bust): probability} of a dealer holding (hard total, has an ace): draws to 17."""
    if _total(hard, ace) >= 17:
        return {min(_total(hard, ace), 22): 1.0}
    dist = {}
    for value, p in CARDS:
        for final, q in _dealer_final(hard + value, ace or value == 1).items():
            dist[final] = dist.get(final, 0.0) + p * q
    return dist


@functools.lru_cache(maxsize=None)
def _stand(player, up):
    """Expected return of standing on `player` against the dealer's up card (the hole card is drawn now)."""
    result = 0.0
    for hole, p in CARDS:
        for final, q in _dealer_final(up + hole, up == 1 or hole == 1).items():
            result += p * q * (1 if final == 22 or player > final else -1 if player < final else 0)
    return result


def _hit(hard, ace, up, p_hit):
    """Expected return of hitting once, then playing on with the same p_hit."""
    return sum(p * (-1.0 if hard + v > 21 else _player(hard + v, ace or v == 1, up, p_hit)) for v, p in CARDS)


@functools.lru_cache(maxsize=None)
def _player(hard, ace, up, p_hit):
    """Expected return from the player's hand; p_hit None: the better of hit and stand, else hit w.p. p_hit."""
    stand, hit = _stand(_total(hard, ace), up), _hit(hard, ace, up, p_hit)
    return max(stand, hit) if p_hit is None else p_hit * hit + (1 - p_hit) * stand


def blackjack_return(p_hit=None):
    """Expected return per hand: basic strategy (p_hit None) or hitting with probability p_hit (0.5: random)."""
    return sum(p1 * p2 * pu * _player(a + b, a == 1 or b == 1, up, p_hit)
               for a, p1 in CARDS for b, p2 in CARDS for up, pu in CARDS)


# ---------------------------------------------------------------- the base model, before RL
def base_report(env_id, episodes=200):
    """Caption accuracy, parse failures and a random policy's success/return on env_id (a child process)."""
    import numpy as np

    import envs
    import tiny_vlm
    import vlm

    model, processor = vlm.load_policy("tiny", env_id=env_id)
    report = dict(model=tiny_model_name(env_id), caption_accuracy=tiny_vlm.caption_accuracy(model, processor, env_id),
                  parse_failure_rate=tiny_vlm.parse_failure_rate(model, processor, env_id))
    env = envs.make_env(env_id)

    def play(forward_share):  # (success rate, mean return) of a blind policy over `episodes` episodes
        rng, wins, returns = np.random.default_rng(0), 0, []
        for episode in range(episodes):
            env.reset(seed=10_000 + episode)
            done, total = False, 0.0
            while not done:
                forward = forward_share and rng.random() < forward_share  # no draw for the random policy
                action = env.actions.index("move forward") if forward else int(rng.integers(len(env.actions)))
                _, reward, terminated, truncated, info = env.step(action)
                done, total = terminated or truncated, total + reward
            wins, returns = wins + info["success"], returns + [total]
        return wins / episodes, statistics.mean(returns)

    success, mean_return = play(0.0)
    forward = play(0.9)[0] if env_id.startswith("MiniWorld") else None
    return dict(report, random_success=success, random_return=mean_return, forward_success=forward)


def base_reports(out, env_ids):
    """{env id: base_report}, each measured once per tiny model (in a one-thread child), kept in OUT/base.json."""
    path = out / "base.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for env_id in env_ids:
        if known.get(env_id, {}).get("model") != tiny_model_name(env_id):
            done = subprocess.run([sys.executable, "-m", "benchmarks.learning", "--base", env_id], env=child_env(),
                                  capture_output=True, text=True, check=True)
            known[env_id] = json.loads(done.stdout.strip().splitlines()[-1])
            path.write_text(json.dumps(known, indent=1))
    return known


# ---------------------------------------------------------------- the table
def episode_success(run_dir):
    """(episodes, successes) in each quarter of the run's env steps, from vldac.py's stdout: MiniWorld's 128-step
    episodes end a few per iteration, so an average over iterations would weigh one episode as much as sixteen. A
    resumed run's log repeats the iterations after its last checkpoint: the last line of each env step counts."""
    rows = [(step, x, n) for step, (x, n) in logged_iterations(run_dir).items() if n]  # none ended: success nan
    last = max(rows)[0] if rows else 0
    def quarter(q):  # (episodes, successes); the log rounds the rate to 2 digits, a count of wins is whole
        keep = [(x, n) for s, x, n in rows if last * q / 4 < s <= last * (q + 1) / 4]
        return sum(n for _, n in keep), sum(round(x * n) for x, n in keep)

    return [quarter(q) for q in range(4)]


def summarise(run, target):
    """One run's figures (see the module docstring); None where the target was never reached."""
    average = moving_average(run["success"]) or run["success"]
    hit = next((i + 2 for i, m in enumerate(moving_average(run["success"])) if m >= target), None) if target else None
    quarter = run["returns"][len(run["returns"]) * 3 // 4:] or run["returns"]
    return dict(first=run["success"][0], peak=max(average), final=statistics.mean(run["success"][-4:]),
                steps_to=run["steps"][hit] if hit is not None else None,
                minutes_to=run["seconds"][hit] / 60 if hit is not None else None,
                last_return=statistics.mean(quarter), minutes=run["wall_s"] / 60, steps=run["steps"][-1])


def report(results, env_ids, base, out):
    lines = ["## Before RL: the base tiny model", "",
             "| env | caption accuracy | parse failures (temperature 1) | random policy: success | random policy: "
             "mean return | blind, 90% forward: success |", "|---|---|---|---|---|---|"]
    for env_id in env_ids:
        b = base[env_id]
        lines.append(f"| {env_id} | {b['caption_accuracy']:.3f} | {b['parse_failure_rate']:.3f} | "
                     f"{b['random_success']:.3f} | {b['random_return']:.3f} | "
                     f"{'-' if b.get('forward_success') is None else format(b['forward_success'], '.3f')} |")
    lines += ["", "## RL: VL-DAC with the tiny defaults", "",
              "| env | variant | seed | success by quarter of the env steps (episodes in the last) | peak "
              "(3-iteration mean) | target: env steps, minutes | mean return, last quarter | caption after RL | "
              "env steps, minutes in all |", "|" + "---|" * 9]
    for env_id in env_ids:
        target = TARGETS.get(env_id)
        for run in sorted((r for r in results if r["env_id"] == env_id), key=lambda r: (r["variant"], r["seed"])):
            s = summarise(run, target)
            quarters = episode_success(out / env_id.split("/")[-1] / run["variant"] / f"seed{run['seed']}")
            reach = "-" if target is None else (f">= {target}: never" if s["steps_to"] is None else
                                                f">= {target}: {s['steps_to']:,}, {s['minutes_to']:.1f} min")
            by_quarter = " / ".join(f"{w / n:.3f}" if n else "-" for n, w in quarters)
            lines.append(f"| {env_id} | {run['variant']} | {run['seed']} | {by_quarter} ({quarters[-1][0]}) | "
                         f"{s['peak']:.2f} | {reach} | {s['last_return']:.3f} | "
                         f"{run['caption_after']:.3f} | {s['steps']:,}, {s['minutes']:.1f} min |")
    if "gym_cards/Blackjack-v0" in env_ids:
        lines += ["", f"Blackjack, expected return per hand under these rules (exact, `blackjack_return`): basic "
                      f"strategy {blackjack_return():.4f}, uniformly random hit/stand {blackjack_return(0.5):.4f}."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="RL on every env with the tiny model (see the module docstring).")
    parser.add_argument("--envs", nargs="+", default=list(BUDGETS), metavar="ENV", help="(default: all eight)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="(default: 1 2 3)")
    parser.add_argument("--variants", nargs="+", default=["vldac"], choices=VARIANTS, metavar="VARIANT",
                        help="benchmarks/ablations.py's VARIANTS (default: vldac, as shipped)")
    parser.add_argument("--total-timesteps", type=int, default=None, help="env steps per run (default: BUDGETS)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time, one thread each")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learning", help="runs (default: runs/learning)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "learning.md",
                        help="the markdown table (default: docs/learning.md)")
    parser.add_argument("--base", help=argparse.SUPPRESS)  # internal: print base_report(ENV) as JSON
    args = parser.parse_args()
    if args.base:
        print(json.dumps(base_report(args.base)))
        return
    unknown = [e for e in args.envs if e not in BUDGETS]
    if unknown:
        parser.error(f"unknown env ids: {' '.join(unknown)}; valid: {' '.join(BUDGETS)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base = base_reports(out, args.envs)
    todo = [(env_id, variant, seed) for env_id in args.envs for variant in args.variants for seed in args.seeds]
    print(f"{len(todo)} runs, {args.jobs} at a time, in {out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(lambda job: run_one(out, *job, args.total_timesteps or BUDGETS[job[0]]),
                                       todo) if r]
    text = "\n".join([
        "# RL on every env with the tiny model", "", report(results, args.envs, base, out), "",
        f"{len(results)}/{len(todo)} runs finished; this invocation took {(time.time() - start) / 60:.0f} min, the "
        f"runs {sum(r['wall_s'] for r in results) / 60:.0f} min summed (runs done earlier are reused; {args.jobs} at a "
        f"time, OMP_NUM_THREADS=1 each). Hardware: {hardware()}.",
        f"Command: python -m benchmarks.learning {' '.join(sys.argv[1:])}"])
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text + "\n")
    print(text + f"\n\nwritten to {args.report}")


if __name__ == "__main__":
    main()
