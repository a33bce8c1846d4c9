"""How strong is a tiny model's weak prior (tiny_vlm.PriorConfig)? Measured per env for a model directory.
- zero-shot success of the base model sampled at temperature 1, as a rollout samples (evaluate.evaluate; episode k
  reset with seed + k), with its 95% Wilson interval and parse failures, beside uniformly random play and the
  expert alone (envs.expert_action followed every step) on the same episodes;
- the mean probability of the expert's action on held-out states (tiny_vlm.expert_probabilities: every action scored
  as the whole answer with the true caption as thoughts, normalised over the actions; exact where sampling and
  counting would add noise, and a misread frame does not count against the prior).
Prints a markdown table and writes it with the figures as JSON (docs/tiny_model.md, "A weak prior"). Without a model,
--mixtures P ...: the success of playing the expert's action with probability P, else a uniformly random one (no
model; what choosing q aims at):
    python -m benchmarks.prior models/tiny-ezpoints --env-ids gym_cards/EZPoints-v0
    python -m benchmarks.prior models/tiny-miniworld --env-ids MiniWorld-OneRoom-v0 MiniWorld-Hallway-v0
    python -m benchmarks.prior --env-ids MiniWorld-OneRoom-v0 --mixtures 0.2 0.25 0.3
"""
import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def scripted_success(env_id, policy, num_episodes, seed):
    """(successes, episodes) of a scripted policy(env, rng) -> action index, episode k reset with seed + k."""
    import envs

    env, rng, successes = envs.make_env(env_id), np.random.default_rng(seed), 0
    for k in range(num_episodes):
        env.reset(seed=seed + k)
        while True:
            _, _, terminated, truncated, info = env.step(policy(env, rng))
            if terminated or truncated:
                successes += info["success"]
                break
    env.close()
    return successes


def measure(model_dir, env_id, num_episodes, num_envs, num_states, seed):
    """One env's row: the base model at temperature 1, random play, the expert alone, the expert's probability."""
    import torch

    import envs
    import evaluate
    import tiny_vlm

    model, processor = tiny_vlm.load(model_dir)
    torch.manual_seed(seed)  # sampled decoding: the same seed, the same samples (as evaluate.py)
    record = evaluate.evaluate(model, processor, env_id, num_episodes, num_envs, temperature=1.0,
                               max_new_tokens=evaluate.DEFAULT_MAX_NEW_TOKENS["tiny"], seed=seed)
    random_play = scripted_success(env_id, lambda env, rng: int(rng.integers(len(env.actions))), num_episodes, seed)
    expert = scripted_success(env_id, lambda env, rng: envs.expert_action(env), num_episodes, seed)
    return dict(env_id=env_id, num_episodes=num_episodes, success=record["success_rate"],
                success_ci95=record["success_ci95"], parse_failures=record["parse_failure_rate"],
                random=random_play / num_episodes, random_ci95=evaluate.wilson_interval(random_play, num_episodes),
                expert=expert / num_episodes,
                expert_probability=float(tiny_vlm.expert_probabilities(model, processor, env_id, num_states).mean()))


def mixture(p):
    """A scripted policy: the expert's action with probability p (where it has one), else uniformly random."""
    import envs

    def policy(env, rng):
        expert = envs.expert_action(env)
        return expert if expert is not None and rng.random() < p else int(rng.integers(len(env.actions)))

    return policy


def markdown(rows):
    header = ("| env | zero-shot success, temperature 1 (95% CI) | random play (95% CI) | expert alone | "
              "p(expert's action) | parse failures |")
    lines = [header, "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['env_id']} | {r['success']:.3f} [{r['success_ci95'][0]:.3f}, {r['success_ci95'][1]:.3f}] "
                     f"| {r['random']:.3f} [{r['random_ci95'][0]:.3f}, {r['random_ci95'][1]:.3f}] | "
                     f"{r['expert']:.3f} | {r['expert_probability']:.3f} | {r['parse_failures']:.3f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a tiny model directory (models/tiny-FAMILY or a build)")
    parser.add_argument("--env-ids", nargs="+", required=True, help="envs of the model's family")
    parser.add_argument("--num-episodes", type=int, default=200, help="episodes per env (default: 200)")
    parser.add_argument("--num-envs", type=int, default=20, help="envs stepped together, one batched generate per "
                        "step (default: 20)")
    parser.add_argument("--num-states", type=int, default=200, help="held-out states drawn for the expert's "
                        "probability (those without an expert action are skipped; default: 200)")
    parser.add_argument("--seed", type=int, default=1, help="episode k is reset with seed + k (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--mixtures", nargs="+", type=float, default=None, metavar="P", help="without a model: "
                        "success of the expert's action with probability P, else a random one, per env")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: runs/prior_{model}.json)")
    a = parser.parse_args()
    if (a.model is None) == (a.mixtures is None):
        parser.error("give a model directory or --mixtures, not both")
    if a.mixtures:
        for env_id in a.env_ids:
            for p in a.mixtures:
                wins = scripted_success(env_id, mixture(p), a.num_episodes, a.seed)
                print(f"{env_id}: expert with probability {p}: success {wins / a.num_episodes:.3f} "
                      f"({a.num_episodes} episodes)", flush=True)
        return
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for env_id in a.env_ids:
        rows.append(measure(a.model, env_id, a.num_episodes, a.num_envs, a.num_states, a.seed))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    output = a.output or ROOT / "runs" / f"prior_{Path(a.model).name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(dict(model=a.model, seed=a.seed, rows=rows, table=table), indent=2))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
