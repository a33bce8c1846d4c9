"""How many env steps does MiniWorld's sparse reward ask of VL-DAC's update when perception is perfect?
The tiny VLM starts from uniformly random play (pre-training teaches it to see and to answer, never what to do),
so RL has to find the way to the red box from the rare episodes that bump into it. This script takes the VLM out:
the policy and the value are two tables over the true scene caption (envs.miniworld_view_text: box in view or not,
its bearing, its distance; 10 classes), both starting at zero (uniform play, V = 0), and they learn with vldac.py's
own update in the tiny defaults' shape: 16 envs x 8 steps per rollout, GAE over env steps (gamma 0.99, lambda
0.95, the time limit bootstrapped as in vldac.py), advantages normalised, the clipped surrogate (clip 0.1) with a
step's action as its one "token", the clipped value loss, the k3 KL to the initial (uniform) policy (beta 0.05),
2 value-only warm-up iterations, 2 epochs of minibatches of 64, a cosine learning rate. No language model, no
pixels: a lower bound on the env steps that learning this task from this reward takes, for a learner that never
misreads a frame and has 40 policy weights to fit instead of millions. The flags, named as vldac.py's, change the
update's settings (docs/perfect_perception.md has a sweep of them). Writes OUT/perfect_perception.md:
    python -m benchmarks.perfect_perception                      # OneRoom and Hallway, seeds 1-5, 49,152 steps
    python -m benchmarks.perfect_perception --envs MiniWorld-OneRoom-v0 --seeds 1 --total-timesteps 2048 --out /tmp/pp
"""
import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.ablations import ROOT, hardware

WHERE = ["straight ahead", "ahead left", "ahead right"]
CAPTIONS = ["no red box in view"] + [f"red box {w}, {d}" for w in WHERE for d in ("near", "mid", "far")]
WINDOW = 30  # episodes in the moving success rate that must reach the target


def train(env_id, seed, total_timesteps, hp):
    """One run with the update's settings hp (the flags); returns [(env step at which an episode ended, reached the
    box), ...] in order."""
    import torch

    import vldac  # its update's pieces: GAE, normalisation, clipped surrogate, value loss, KL

    torch.manual_seed(seed)
    logits = torch.zeros(len(CAPTIONS), 4, requires_grad=True)  # (captions, actions): the policy, uniform at first
    values = torch.zeros(len(CAPTIONS), requires_grad=True)  # (captions,)
    # created before the envs: Adam's first use imports triton, which crashes once a GL context exists
    optimizer = torch.optim.Adam([logits, values], lr=hp.learning_rate)
    import envs

    num_envs, num_steps, minibatch, clip, beta = hp.num_envs, hp.num_steps, hp.minibatch_size, hp.clip_coef, hp.kl_beta
    rng = np.random.default_rng(seed)
    world = [envs.make_env(env_id) for _ in range(num_envs)]
    for env in world:
        env.reset(seed=int(rng.integers(2**31)))
    state = [CAPTIONS.index(env.state_text()) for env in world]  # each env's caption index
    ends, step, iterations = [], 0, total_timesteps // (num_envs * num_steps)
    # vldac.py's schedule, cosine to a tenth as the tiny defaults (3e-4 -> 3e-5)
    schedule = SimpleNamespace(baseline="vldac", num_iterations=iterations, learning_rate=hp.learning_rate,
                               end_learning_rate=hp.learning_rate / 10)
    for iteration in range(1, iterations + 1):
        optimizer.param_groups[0]["lr"] = vldac.cosine_learning_rate(iteration, schedule)
        shape = (num_steps, num_envs)
        s, a, old_logp = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long), torch.zeros(shape)
        rewards, terminated, truncated, bootstrap = (torch.zeros(shape), torch.zeros(shape, dtype=torch.bool),
                                                     torch.zeros(shape, dtype=torch.bool), torch.zeros(shape))
        for t in range(num_steps):
            s[t] = torch.tensor(state)
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=logits[s[t]])
                a[t] = dist.sample()
                old_logp[t] = dist.log_prob(a[t])
            for i, env in enumerate(world):
                _, reward, term, trunc, info = env.step(int(a[t, i]))
                rewards[t, i], terminated[t, i], truncated[t, i] = reward, term, trunc and not term
                if truncated[t, i]:  # a time limit: V(truncated state), as vldac.py
                    bootstrap[t, i] = values[CAPTIONS.index(env.state_text())].detach()
                if term or trunc:
                    ends.append((step + (t + 1) * num_envs, bool(info["success"])))
                    env.reset(seed=int(rng.integers(2**31)))
                state[i] = CAPTIONS.index(env.state_text())
        step += num_steps * num_envs
        with torch.no_grad():
            old_values = values[s]  # (T, N)
            advantages, returns = vldac.compute_gae(rewards, old_values, terminated, truncated, bootstrap,
                                                    values[torch.tensor(state)], hp.gamma, hp.gae_lambda)
            if hp.norm_adv:
                advantages = vldac.normalize_advantages(advantages)
        flat = [x.flatten() for x in (s, a, old_logp, advantages, returns, old_values)]
        for _ in range(hp.update_epochs):
            for mb in torch.randperm(num_envs * num_steps).split(minibatch):
                ms, ma, mlp, madv, mret, mval = (x[mb] for x in flat)
                log_probs = torch.log_softmax(logits[ms], -1)  # (B, 4)
                logp = log_probs.gather(1, ma[:, None])  # (B, 1): one "token" per step
                mask = torch.ones_like(logp, dtype=torch.bool)
                pg = vldac.token_ppo_loss(logp, mlp[:, None], madv, mask, clip)
                kl = vldac.kl_penalty(logp, torch.full_like(logp, -math.log(4)), mask)  # reference: uniform play
                v = vldac.value_loss(values[ms], mval, mret, clip)
                loss = v if iteration <= hp.value_warmup_iters else pg + beta * kl + v
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return ends


def first_reach(ends, target):
    """Env step at which the success rate of the last WINDOW ended episodes first reaches target (None: never)."""
    wins = [w for _, w in ends]
    return next((ends[i - 1][0] for i in range(WINDOW, len(ends) + 1) if np.mean(wins[i - WINDOW:i]) >= target), None)


def rate(ends, lo, hi):
    window = [w for s, w in ends if lo < s <= hi]
    return f"{np.mean(window):.2f} ({len(window)})" if window else "-"


def main():
    import config
    import vldac  # the defaults below are its own: the tiny defaults, MiniWorld's GAE settings, its clip

    tiny, gae = config.TINY_DEFAULTS, config.GAE_DEFAULTS["MiniWorld"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " A tabular policy on the true scene "
                                     "caption, trained with vldac.py's update; writes OUT/perfect_perception.md.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["MiniWorld-OneRoom-v0", "MiniWorld-Hallway-v0"],
                        help="MiniWorld env ids")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="one run per seed and env")
    parser.add_argument("--total-timesteps", type=int, default=49_152, help="env steps per run")
    parser.add_argument("--learning-rate", type=float, default=0.02,
                        help="Adam's, for the two tables (0.02, as the first tables of docs/perfect_perception.md; its "
                        "sweep at 16,384 env steps finds 0.1 better)")
    # the update's other settings, named and defaulted as vldac.py's flags for the tiny model on MiniWorld
    parser.add_argument("--num-envs", type=int, default=tiny["num_envs"], help="parallel envs")
    parser.add_argument("--num-steps", type=int, default=tiny["num_steps"], help="env steps per env per rollout")
    parser.add_argument("--minibatch-size", type=int, default=tiny["minibatch_size"], help="env steps per minibatch")
    parser.add_argument("--update-epochs", type=int, default=tiny["update_epochs"], help="passes over each rollout")
    parser.add_argument("--clip-coef", type=float, default=vldac.Args.clip_coef,
                        help="the surrogate's and the value loss's clip")
    parser.add_argument("--kl-beta", type=float, default=tiny["kl_beta"], help="KL to the initial (uniform) policy")
    parser.add_argument("--value-warmup-iters", type=int, default=tiny["value_warmup_iters"],
                        help="first iterations that train the value only")
    parser.add_argument("--gamma", type=float, default=gae["gamma"], help="discount")
    parser.add_argument("--gae-lambda", type=float, default=gae["gae_lambda"], help="GAE's lambda")
    parser.add_argument("--norm-adv", action=argparse.BooleanOptionalAction, default=True,
                        help="normalise the advantages per rollout")
    parser.add_argument("--budget", type=int, default=16_384,
                        help="also report the success rate around this many env steps (benchmarks/learning.py's "
                        "MiniWorld budget: 30 minutes of one core for the tiny VLM)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process each")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="directory for perfect_perception.md")
    args = parser.parse_args()
    import envs

    for env_id in args.envs:
        if env_id not in envs.MINIWORLD_IDS:
            parser.error(f"--envs takes MiniWorld ids ({', '.join(envs.MINIWORLD_IDS)}), not {env_id}")
    start = time.time()
    grid = [(env_id, seed) for env_id in args.envs for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:  # "fork" hangs with GL contexts
        results = list(pool.map(train, *zip(*grid), [args.total_timesteps] * len(grid), [args] * len(grid)))
    total, quarter = args.total_timesteps, args.total_timesteps // 4
    lines = ["# Sparse reward with perfect perception: a tabular policy on the true scene, VL-DAC's update", "",
             "The policy and the value are tables over the true scene caption (10 classes: box in view or not, its "
             "bearing, its distance), zero at first (uniform play), trained with vldac.py's GAE, advantage "
             "normalisation, per-token clipped surrogate, clipped value loss, KL to the initial policy and value "
             f"warm-up ({args.value_warmup_iters} iterations), {args.num_envs} envs x {args.num_steps} steps, "
             f"{args.update_epochs} epochs of minibatches of {args.minibatch_size}, clip {args.clip_coef}, KL beta "
             f"{args.kl_beta}, lambda {args.gae_lambda}{'' if args.norm_adv else ', advantages not normalised'}, Adam "
             f"at {args.learning_rate} with a cosine to a tenth over the run. No pixels, no language model: how many "
             "env steps the paper's sparse reward asks for from a uniformly random start "
             "(`benchmarks/perfect_perception.py` has the details).", "",
             "| env | seed | success by quarter of the env steps (episodes that ended) | success around "
             f"{args.budget:,} env steps (the last {WINDOW} episodes before) | env steps at which the success "
             f"rate of the last {WINDOW} episodes first reaches 0.9 |", "|---|---|---|---|---|"]
    summary = []  # per env: the mean over seeds around the budget, and how many seeds reached 0.9 by then
    for env_id in args.envs:
        runs = [ends for (e, _), ends in zip(grid, results) if e == env_id]
        around = [np.mean([w for s, w in ends if s <= args.budget][-WINDOW:]) for ends in runs]
        reached = sum((first_reach(ends, 0.9) or math.inf) <= args.budget for ends in runs)
        summary.append(f"{env_id}: around {args.budget:,} env steps {np.mean(around):.2f} (mean of {len(runs)} "
                       f"seeds: {' / '.join(f'{x:.2f}' for x in around)}); 0.9 reached by then: "
                       f"{reached} of {len(runs)}")
    for (env_id, seed), ends in zip(grid, results):
        quarters = " / ".join(rate(ends, q * quarter, (q + 1) * quarter) for q in range(4))
        before = [w for s, w in ends if s <= args.budget][-WINDOW:]
        reach = first_reach(ends, 0.9)
        lines.append(f"| {env_id} | {seed} | {quarters} | {np.mean(before):.2f} | "
                     f"{f'{reach:,}' if reach else f'not within {total:,}'} |")
    minutes = (time.time() - start) / 60
    lines += ["", *summary, "",
              f"{len(grid)} runs of {total:,} env steps, {args.jobs} at a time, in {minutes:.0f} min. Hardware: "
              f"{hardware()}.", "Command: python -m benchmarks.perfect_perception " + " ".join(sys.argv[1:])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perfect_perception.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
