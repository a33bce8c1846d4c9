# The methods VL-DAC (arXiv 2508.04280) is compared with, as vldac.py runs them: RL4VLM (Zhai et al. 2024) with
# --policy-loss rl4vlm / --baseline rl4vlm, and LOOP (Chen et al. 2025) with --baseline loop.
import bisect
import re

import torch


# ---- RL4VLM (Zhai et al. 2024): one PPO ratio per env step on a weighted log-prob (--policy-loss rl4vlm) ----
def action_token_mask(tokenizer, response_ids):
    """RL4VLM's thought/action split of one response (R,): True from the token holding the `"action"` field's
    opening quote onwards (end-of-turn included). Found in the decoded text, so it works for any tokenizer
    (RL4VLM matches hard-coded token ids). A response without the field is all thought: all False."""
    match = re.search(r'"action"\s*:', tokenizer.decode(response_ids))
    if match is None:
        return torch.zeros(len(response_ids), dtype=torch.bool)
    # first k whose decoded prefix ids[:k] reaches past the field's first character: token k - 1 holds it
    k = bisect.bisect_right(range(len(response_ids) + 1), match.start(),
                            key=lambda k: len(tokenizer.decode(response_ids[:k])))
    return torch.arange(len(response_ids)) >= k - 1


def rl4vlm_logprob(logprobs, token_mask, action_mask, thought_coef):
    """RL4VLM's log-prob of a whole step, lambda * sum log pi(thought tokens) + sum log pi(action tokens), (B,)."""
    weights = torch.where(action_mask, 1.0, thought_coef)  # (B, R)
    return torch.where(token_mask, logprobs * weights, 0.0).sum(1)


def rl4vlm_ppo_loss(logprobs, old_logprobs, advantages, token_mask, action_mask, thought_coef, clip_coef):
    """RL4VLM's policy loss: ONE clipped PPO ratio per step, on the lambda-weighted summed log-prob, (B, R) -> ()."""
    ratio = (rl4vlm_logprob(logprobs, token_mask, action_mask, thought_coef)
             - rl4vlm_logprob(old_logprobs, token_mask, action_mask, thought_coef)).exp()  # (B,)
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()


# ---- LOOP (Chen et al. 2025), no critic: K episodes of one task, leave-one-out advantages (--baseline loop) ----
def loop_advantages(episode_returns, episode_of_step, group_size):
    """Episode i's return minus the mean return of the other K - 1 episodes of its group (same task), given to every
    step of episode i: (S,). Groups are consecutive runs of group_size episodes (rollout.collect_episodes)."""
    returns = episode_returns.view(-1, group_size)  # (G, K)
    others = (returns.sum(1, keepdim=True) - returns) / (group_size - 1)  # (G, K): leave-one-out means
    return (returns - others).flatten()[episode_of_step]  # (S,)


def loop_rollout(runner, agent, processor, args, trajectories=None):
    """LOOP's stages 1-3: one whole episode per env, K per task; its advantages; no value targets (vf_coef 0)."""
    batch = runner.collect_episodes(agent, processor, args.loop_group_size, trajectories)
    episode_returns = torch.tensor([e["episodic_return"] for e in batch.episodes])  # (N,)
    return batch, loop_advantages(episode_returns, batch.episode_of_step, args.loop_group_size), batch.values
