"""Speed of the environments and the answer parser alone, no model: ms per card-game step (render included)
and the slowest parse of the hostile answers the tests feed the parser (huge, deeply nested, unterminated).
Usage: python -m benchmarks.env_speed [--steps 300]"""
import argparse
import json
import time

import numpy as np

import envs

HOSTILE = ["{" * 100_000, '{"a": ' * 5_000, "x" * 1_000_000, "[" * 10_000 + '{"action": "+"}',
           "__import__('os').system('touch pwned')"]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=300, help="env steps timed per card game")
args = parser.parse_args()

for env_id in envs.CARD_IDS:
    env = envs.make_env(env_id)
    env.reset(seed=0)
    env.step(0)  # the first render fills the card cache
    start = time.perf_counter()
    for i in range(args.steps):
        _, _, terminated, truncated, _ = env.step(json.dumps({"action": env.actions[i % len(env.actions)]}))
        if terminated or truncated:
            env.reset()
    print(f"{env_id}: {(time.perf_counter() - start) / args.steps * 1e3:.2f} ms per step")

rng, slowest = np.random.default_rng(0), 0.0
for text in HOSTILE:
    start = time.perf_counter()
    envs.parse_action(text, ["-", "+"], rng)
    slowest = max(slowest, time.perf_counter() - start)
print(f"slowest hostile parse: {slowest * 1e3:.1f} ms (of {len(HOSTILE)} answers up to 1 MB)")
