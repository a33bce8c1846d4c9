"""What a tiny NumberLine model brings to RL before any RL: measured per model directory, to tell two builds of one
recipe apart (docs/results.md, "Why some builds learned slowly"). Prints a markdown table, one column per model:
- p("+") sampled at temperature 1 in each of the 30 states (target != current), its mean and spread over states;
- the share of sampled thoughts that name both numbers right, and of answers that do not parse;
- a linear read-out of the caption from the value head's input (tiny_vlm.state_readout_accuracy);
- the cosine between the policy gradient of the per-token loss and its action-token part, on 128 sampled answers
  with advantage +1 for a right move and -1 for a wrong one (how much of the update the thoughts' noise makes);
- supervised Adam steps (lr 3e-4, the action token alone, thoughts teacher-forced right) until the mean probability
  of the right move over the 30 states reaches 0.9: how far the decision is from the base model's weights.
And, with --advantages, the correlation of a step's normalised GAE advantage with its move being right under
uniformly random play (the base model's), by simulation, for lambda 1 / 0.9 / 0.5 and a zero or exact critic.
    python -m benchmarks.build_diagnostics models/tiny-numberline runs/builds/seed1/tiny-numberline --advantages
"""
import argparse
import functools
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def states_and_frames(envs):
    env = envs.make_env("gym_cards/NumberLine-v0")
    states = [(g, p) for g in range(6) for p in range(6) if g != p]
    return env, states, [[envs._number_line_image(g, p)] for g, p in states]


def sampled_actions(model, processor, samples):
    """p("+") per state, thoughts right, parse failures: `samples` answers per state at temperature 1."""
    import envs
    import rollout

    env, states, frames = states_and_frames(envs)
    rng, plus, right, failed = np.random.default_rng(0), [], 0, 0
    for (g, p), image in zip(states, frames):
        batch = rollout.prompt_inputs(processor, [image] * samples, [env.prompt()] * samples, "cpu")
        ids = rollout.generate(model, batch, processor.tokenizer.pad_token_id, rollout.Sampling(1.0, 48))
        answers = processor.batch_decode(ids, skip_special_tokens=True)
        parsed = [envs.parse_action(a, env.actions, rng) for a in answers]
        plus.append(np.mean([action == 1 for action, _ in parsed]))
        right += sum(f"Target: {g}, Current: {p}" in a for a in answers)
        failed += sum(f for _, f in parsed)
    n = samples * len(states)
    return dict(p_plus=float(np.mean(plus)), p_plus_sd=float(np.std(plus)), thoughts_right=right / n,
                parse_failures=failed / n)


def right_answers(processor, states):
    """The 30 states' answers with the right thoughts and the right move, as response ids, mask, action column."""
    import torch

    tok = processor.tokenizer
    rows = [tok(json.dumps({"thoughts": f"Target: {g}, Current: {p}", "action": "+" if g > p else "-"})
                + "<|im_end|>")["input_ids"] for g, p in states]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, mask


def gradient_cosine(model, processor, seed=0):
    """cos(full per-token policy gradient, its action-token part) on 128 answers sampled from random states."""
    import torch

    import envs
    import rollout
    import vldac

    env, rng = envs.make_env("gym_cards/NumberLine-v0"), np.random.default_rng(seed)
    torch.manual_seed(seed)
    frames, states = [], []
    for i in range(128):
        env.reset(seed=i)
        frames.append([env.unwrapped._image()])
        states.append((env.unwrapped.goal, env.unwrapped.position))
    inputs = rollout.prompt_inputs(processor, frames, [env.prompt()] * len(states), "cpu")
    response = rollout.generate(model, inputs, processor.tokenizer.pad_token_id, rollout.Sampling(1.0, 48))
    mask = rollout.response_mask(response, torch.tensor(rollout.eos_token_ids(model)))
    moves = [envs.parse_action(a, env.actions, rng)[0]
             for a in processor.batch_decode(response, skip_special_tokens=True)]
    advantage = torch.tensor([1.0 if m == int(g > p) else -1.0 for m, (g, p) in zip(moves, states)])
    action_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ('Ġ"+"}', 'Ġ"-"}')]
    is_action = torch.isin(response, torch.tensor(action_ids))  # (B, R)
    agent = vldac.Agent(model, rollout.Sampling(1.0, 48))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(tokens):
        model.zero_grad()
        logprobs, _ = agent.get_logprobs_and_value(inputs, response, mask)
        picked = torch.where(mask & tokens, logprobs, 0.0)
        (-(picked.sum(1) / mask.sum(1)) * advantage).mean().backward()
        return torch.cat([p.grad.flatten() for p in params])

    action, rest = gradient(is_action), gradient(~is_action)
    full = action + rest
    return float(full @ action / (full.norm() * action.norm()))


def supervised_steps(path, lr=3e-4, limit=300):
    """Adam steps on -log p(right move) alone (right thoughts teacher-forced) until mean p(right) >= 0.9."""
    import torch

    import envs
    import rollout
    import vldac
    import vlm

    model, processor = vlm.load_policy(path, "cpu")
    env, states, frames = states_and_frames(envs)
    inputs = rollout.prompt_inputs(processor, frames, [env.prompt()] * len(states), "cpu")
    response, mask = right_answers(processor, states)
    action_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(t) for t in ('Ġ"+"}', 'Ġ"-"}')])
    column = torch.isin(response, action_ids).float().argmax(1)  # (30,): where the move is
    agent = vldac.Agent(model, rollout.Sampling(1.0, 48))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(limit + 1):
        logprobs, _ = agent.get_logprobs_and_value(inputs, response, mask)
        right = logprobs[torch.arange(len(states)), column]
        if right.exp().mean() >= 0.9:
            return step
        optimizer.zero_grad()
        (-right.mean()).backward()
        optimizer.step()
    return None


def advantage_correlation(episodes=20000, seed=0):
    """corr(normalised GAE advantage, move is right) under uniformly random NumberLine play."""
    def move(g, p, a):
        before, p = abs(p - g), max(p - 1, 0) if a == 0 else min(p + 1, 5)
        done = p == g
        return p, 1.0 if done else (-1.0 if abs(p - g) >= before else 0.0), done

    @functools.lru_cache(maxsize=None)
    def exact(g, p, t):  # value of uniform play with t of the 10 steps taken
        if t >= 10:
            return 0.0
        return sum(0.5 * (r + (0.0 if done else exact(g, q, t + 1))) for q, r, done in (move(g, p, a) for a in (0, 1)))

    rng, played = np.random.default_rng(seed), []
    for _ in range(episodes):
        p, g = int(rng.integers(6)), int(rng.integers(6))
        g = (g + 1) % 5 if g == p else g  # as NumberLineEnv.reset
        steps = []
        for t in range(10):
            a = int(rng.integers(2))
            q, r, done = move(g, p, a)
            steps.append((g, p, t, a, r, done, q))
            p = q
            if done:
                break
        played.append(steps)
    rows = []
    for name, critic in (("zero critic", lambda g, p, t: 0.0), ("exact critic", exact)):
        for lam in (1.0, 0.9, 0.5):
            advantages, right = [], []
            for steps in played:
                last, out = 0.0, []
                for g, p, t, a, r, done, q in reversed(steps):
                    delta = r + (0.0 if done else critic(g, q, t + 1)) - critic(g, p, t)
                    last = delta + lam * last
                    out.append(last)
                advantages += out[::-1]
                right += [(g > p) == (a == 1) for g, p, t, a, r, done, q in steps]
            rows.append((name, lam, float(np.corrcoef(advantages, right)[0, 1])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="tiny NumberLine model directories")
    parser.add_argument("--samples", type=int, default=16, help="answers sampled per state for p(+)")
    parser.add_argument("--advantages", action="store_true", help="also the advantage correlation by simulation")
    a = parser.parse_args()
    if a.samples < 1:
        parser.error("--samples must be >= 1")
    import torch

    import tiny_vlm
    import vlm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    columns = []
    for path in a.models:
        model, processor = vlm.load_policy(path, "cpu")
        row = sampled_actions(model, processor, a.samples)
        row["readout"] = tiny_vlm.state_readout_accuracy(model, processor, "gym_cards/NumberLine-v0")
        row["cosine"] = gradient_cosine(model, processor)
        row["supervised_steps"] = supervised_steps(path)
        columns.append(row)
    if columns:
        print("| measured on the base model | " + " | ".join(a.models) + " |")
        print("|---|" + "---|" * len(columns))
        for key, label in [("p_plus", 'p("+") at temperature 1, mean over the 30 states'),
                           ("p_plus_sd", "its standard deviation over the states"),
                           ("thoughts_right", "sampled thoughts naming both numbers right"),
                           ("parse_failures", "answers that do not parse"),
                           ("readout", "caption read-out from the value head's input"),
                           ("cosine", "cosine of the policy gradient with its action-token part"),
                           ("supervised_steps", "supervised Adam steps to p(right move) >= 0.9")]:
            print(f"| {label} | " + " | ".join(f"{c[key]:.3f}" if isinstance(c[key], float) else str(c[key])
                                                for c in columns) + " |")
    if a.advantages:
        print("\n| critic | lambda | corr(advantage, right move) under random play |\n|---|---|---|")
        for name, lam, corr in advantage_correlation():
            print(f"| {name} | {lam} | {corr:.2f} |")


if __name__ == "__main__":
    main()
