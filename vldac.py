# VL-DAC, Vision-Language Decoupled Actor-Critic (Bredis et al., arXiv 2508.04280); see docs/algorithm.md
"""Train a vision-language model as an agent with VL-DAC: credit assignment per ENV STEP (one value, one
GAE advantage per step), policy update per TOKEN (every generated token gets its step's advantage, its own
PPO ratio and clip). Run:
    python vldac.py --env-id gym_cards/NumberLine-v0                     # the tiny model, CPU
    python vldac.py --env-id MiniWorld-OneRoom-v0 --model-id Qwen/Qwen2-VL-7B-Instruct   # the paper
    python vldac.py --resume runs/RUN_NAME                               # after a crash or Ctrl-C
    torchrun --standalone --nproc-per-node 8 vldac.py --env-id ...       # data parallel over 8 GPUs
"""
import contextlib
import copy
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from peft import PeftModel

import baselines
import checkpoint
import config
import distributed
import envs
import evaluate
import rollout
import vlm
from distributed import RANK, WORLD_SIZE
from flags import fail


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (random, numpy, torch; env i is seeded seed + i)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    bf16: Optional[bool] = None
    """bf16 weights under bf16 autocast; trainable weights and Adam's state stay fp32 (None: on CUDA only)"""
    static_cache: Optional[bool] = None
    """decode with transformers' static KV cache, compiled on CUDA (None: on CUDA with LoRA; docs/gpu.md)"""
    merge_lora_rollout: bool = False
    """decode with the LoRA adapter merged into the weights, restored after each generate (docs/gpu.md)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "vldac"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = True
    """save policy, value head, processor and args at the end (runs/{run_name}/model; evaluate.py loads it)"""
    save_dir: Optional[str] = None
    """where --save-model writes (default: runs/{run_name}/model)"""
    trajectories_every: int = 0
    """every N iterations, write that rollout's steps to runs/{run_name}/trajectories/iter{N}; 0: never"""
    eval_episodes: int = 50
    """after --save-model, greedy evaluation episodes (paper: 50), 2 recorded as GIFs; 0 skips it"""
    threads: int = 1
    """torch CPU threads, 0: one per core (docs/performance.md: when more threads help)"""
    checkpoint_every: int = 10
    """write runs/{run_name}/checkpoint.pt every this many updates and after the last, atomically; 0: never"""
    resume: Optional[str] = None
    """a run directory (runs/{run_name}): continue it from its last checkpoint, with that run's own flags"""

    # Environment
    env_id: str = "gym_cards/NumberLine-v0"
    """the id of the environment (envs.ENV_IDS)"""
    num_frames: Optional[int] = None
    """frames in the prompt (None: 4 for MiniWorld, 1 for gym-cards, as the paper, Table 6)"""
    frame_size: tuple[int, int] = (80, 60)
    """MiniWorld frame (width, height); 80x60 as the authors' code"""
    text_obs: bool = False
    """if toggled, the prompt also states the last frame's content in text (the tiny model never saw it)"""
    invalid_action_penalty: Optional[float] = None
    """reward added when an answer cannot be parsed (None: none; the env plays a random action anyway)"""
    reward_shaping: float = 0.0
    """MiniWorld only, NOT the paper: a diagnostic shaped reward towards the red box (0: the sparse reward)"""

    # Model. None = the model's defaults table below: PAPER_DEFAULTS, or TINY_DEFAULTS for --model-id tiny
    model_id: str = "tiny"
    """`tiny` (the shipped one for --env-id, models/), a hub id, a local directory, or a vldac checkpoint"""
    lora_r: Optional[int] = None
    """LoRA rank, 0 = full fine-tune (paper: 16, Table 6)"""
    lora_alpha: Optional[int] = None
    """LoRA alpha (paper: 32, Table 6)"""
    lora_dropout: float = 0.0
    """LoRA dropout (paper: 0.1; 0 as TRL's PPO: the rollout scores without it, the ratio would be noisy)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are scored at the same temperature (full distribution, no top-k/p)"""
    max_new_tokens: Optional[int] = None
    """response length limit (the authors' code: 256)"""

    # Algorithm
    total_timesteps: Optional[int] = None
    """total env steps (paper: 51,200, Table 6)"""
    num_envs: Optional[int] = None
    """parallel envs, one batched generate per env step (the authors' code: 1; docs/gpu.md: more on a GPU)"""
    num_steps: Optional[int] = None
    """env steps per env per rollout (the authors' code: 256 steps of 1 env)"""
    learning_rate: Optional[float] = None
    """Adam learning rate at the start of the cosine schedule (paper: 5e-5, Table 6)"""
    end_learning_rate: Optional[float] = None
    """learning rate at the last iteration (paper: 1e-7, Table 6)"""
    gamma: Optional[float] = None
    """discount (paper, Table 6: MiniWorld 0.99, EZPoints 1; None: GAE_DEFAULTS)"""
    gae_lambda: Optional[float] = None
    """GAE lambda over env steps (paper, Table 6: MiniWorld 0.95, EZPoints 1; None: GAE_DEFAULTS)"""
    update_epochs: Optional[int] = None
    """PPO epochs per rollout (paper: 2, Table 6)"""
    minibatch_size: Optional[int] = None
    """env steps per optimizer step (paper: 128, Table 6)"""
    micro_batch_size: Optional[int] = None
    """env steps per forward/backward, gradients accumulated over the minibatch (the authors' code: 1)"""
    norm_adv: bool = True
    """normalise advantages over the rollout (the authors' code)"""
    clip_coef: float = 0.1
    """PPO clip epsilon, per token (the authors' code: 0.1)"""
    clip_vloss: bool = True
    """clip the value update around V_old with clip_coef (the authors' code)"""
    vf_coef: Optional[float] = None
    """value loss coefficient alpha, Eq. 6 (paper: 0.15, Table 6)"""
    kl_beta: Optional[float] = None
    """per-token k3 KL penalty to the reference policy, Eq. 6 (paper: 0.05, Table 6)"""
    value_warmup_iters: Optional[int] = None
    """first updates train the value head only ("policy freeze"; paper: 2, Table 6)"""
    max_grad_norm: Optional[float] = None
    """global gradient-norm clip (the authors' code: 0.01)"""

    # Baselines and ablations (benchmarks/ablations.py); the defaults are VL-DAC
    baseline: Literal["vldac", "rl4vlm", "loop"] = "vldac"
    """`rl4vlm`: RL4VLM as published (Zhai et al. 2024); `loop`: LOOP (Chen et al. 2025); BASELINES below"""
    loop_group_size: int = 4
    """LOOP's K: episodes per group, all from the same env seed (--baseline loop; divides --num-envs)"""
    policy_loss: Literal["token", "rl4vlm"] = "token"
    """`token`: a PPO ratio per generated token (Eq. 3); `rl4vlm`: one ratio per step (baselines.py)"""
    thought_coef: float = 0.5
    """RL4VLM's lambda, the weight of the thought tokens (--policy-loss rl4vlm; RL4VLM: 0.5 on gym-cards)"""
    value_stop_grad: bool = True
    """stop-gradient between value head and backbone (Eq. 4); --no-value-stop-grad: value loss trains both"""

    # filled in at runtime (not command-line flags)
    batch_size: tyro.conf.Suppress[int] = 0
    """env steps per rollout: num_envs * num_steps"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """rollout + update iterations: total_timesteps // (batch_size * ranks)"""


# ---- The VL-DAC losses (Eq. 3, 4, 6) and GAE over env steps: plain functions of tensors ----

def token_logprobs(logits, response_ids, temperature, suppress_token_ids=()):
    """log-softmax of logits / T at the response ids, float32, (B, R). Suppressed tokens are scored
    as generate() samples them: probability 0."""
    logits = logits.float() / temperature  # (B, R, V)
    if len(suppress_token_ids):
        logits = logits.index_fill(-1, torch.tensor(suppress_token_ids, device=logits.device), float("-inf"))
    picked = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
    return picked - logits.logsumexp(-1)


def masked_step_mean(x, token_mask):
    """Mean over each step's generated tokens, (B, R) -> (B,); padding selected away (inf * 0 is NaN)."""
    return torch.where(token_mask, x, 0.0).sum(1) / token_mask.sum(1).clamp(min=1)


def masked_log_ratio(logprobs, other_logprobs, token_mask):
    """logprobs - other_logprobs on generated tokens, 0 on padding, (B, R): safe to exponentiate, and its
    gradient on padding is 0 (torch.where after exp would still pass inf * 0 = NaN to the backward)."""
    return torch.where(token_mask, logprobs - other_logprobs, 0.0)


def compute_gae(rewards, values, terminated, truncated, bootstrap_values, last_values, gamma, gae_lambda):
    """GAE over env steps, (T, N) tensors. delta_t = r_t + gamma V(s_{t+1}) (1 - terminated_t) - V(s_t);
    after a truncation V(s_{t+1}) is the truncated state's value and nothing flows across the reset."""
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(last_values)
    for t in reversed(range(rewards.shape[0])):
        next_values = last_values if t == rewards.shape[0] - 1 else values[t + 1]  # (N,)
        next_values = torch.where(truncated[t], bootstrap_values[t], next_values)  # V(truncated state)
        next_nonterminal = (~terminated[t]).float()
        next_same_episode = (~(terminated[t] | truncated[t])).float()
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        last_gae = delta + gamma * gae_lambda * next_same_episode * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


def normalize_advantages(advantages):
    """Zero mean, unit std over the whole rollout, of every rank under torchrun (the authors' code)."""
    every_advantage = distributed.all_ranks(advantages.flatten())  # (T * N * ranks,)
    return (advantages - every_advantage.mean()) / (every_advantage.std() + 1e-8)


def clipped_surrogate(ratio, advantages, clip_coef):
    """PPO's pessimistic loss max(-A r, -A clip(r, 1 - eps, 1 + eps)), elementwise."""
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    return torch.max(pg_loss1, pg_loss2)


def token_ppo_loss(logprobs, old_logprobs, advantages, token_mask, clip_coef):
    """Eq. 3: per-token clipped surrogate, each token with its step's advantage; mean per step, then steps."""
    ratio = masked_log_ratio(logprobs, old_logprobs, token_mask).exp()  # (B, R)
    return masked_step_mean(clipped_surrogate(ratio, advantages[:, None], clip_coef), token_mask).mean()


def kl_penalty(logprobs, ref_logprobs, token_mask):
    """L_KL of Eq. 6: the k3 estimate of KL(pi || pi_ref) per token; mean over a step's tokens, then steps."""
    log_ref_ratio = masked_log_ratio(ref_logprobs, logprobs, token_mask)  # (B, R)
    return masked_step_mean(log_ref_ratio.exp() - log_ref_ratio - 1, token_mask).mean()


def value_loss(values, old_values, returns, clip_coef=None):
    """Eq. 4: 1/2 (V(s_t) - R_t)^2, optionally clipped around V_old (the authors' code)."""
    v_loss = (values - returns) ** 2
    if clip_coef is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    return 0.5 * v_loss.mean()


def cosine_learning_rate(iteration, args, global_step=0):
    """Table 6: cosine decay from learning_rate (iteration 1) to end_learning_rate (the last iteration).
    LOOP's rollouts (whole episodes) vary in length: it decays over env steps instead."""
    progress = (min(1.0, global_step / args.total_timesteps) if args.baseline == "loop"
                else (iteration - 1) / max(1, args.num_iterations - 1))  # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return args.end_learning_rate + (args.learning_rate - args.end_learning_rate) * cosine


# ---- The agent: the VLM policy, its value head on the last prompt token, the KL reference ----
def make_value_head(hidden):
    """V_phi (Eq. 4): an MLP on the last prompt token's state. The official head is hidden -> 3072 -> 2048
    -> 1; for small models the widths shrink with the hidden size (4x, then 2/3 of that)."""
    width = min(3072, 4 * hidden)
    return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width * 2 // 3), nn.ReLU(),
                         nn.Linear(width * 2 // 3, 1))


class Agent(nn.Module):
    """The VLM policy, its value head, and the KL reference (the adapter disabled, or a frozen copy)."""

    def __init__(self, policy, sampling=rollout.Sampling(), value_stop_grad=True):
        super().__init__()
        self.policy, self.value_stop_grad = policy, value_stop_grad
        self.sampling = sampling  # how the rollout decodes; log-probs are scored at its temperature
        hidden = rollout.base_model(policy).config.get_text_config().hidden_size
        self.value_head = make_value_head(hidden).to(policy.device)
        # with LoRA the reference is the same network with the adapter disabled: no second copy in memory
        lora = isinstance(policy, PeftModel)
        self.reference = None if lora else [copy.deepcopy(policy).eval().requires_grad_(False)]
        self.suppress_token_ids = rollout.vision_token_ids(policy)  # scored as generate() samples them: never
        self.eos_token_ids = rollout.eos_token_ids(policy)

    @property
    def device(self):
        return self.policy.device

    def _hidden(self, model, inputs, response_ids, token_mask):
        """Last-layer hidden states over prompt + response, (B, P + R, H)."""
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], response_ids], 1)  # (B, P + R)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], token_mask.long()], 1)
        for key in rollout.TEXT_MARKS:  # text (0) / image (1) marks, where the family has them: text here
            if key in inputs:
                full[key] = torch.cat([inputs[key], torch.zeros_like(response_ids)], 1)
        with rollout.compute_context(model):  # bf16 autocast where the weights are bf16 (GPU)
            return rollout.base_model(model).model(**full, use_cache=False).last_hidden_state

    def _logprobs(self, model, hidden, response_ids):
        prompt_len = hidden.shape[1] - response_ids.shape[1]
        with rollout.compute_context(model):
            # (B, R, V): position j predicts token j + 1
            logits = rollout.base_model(model).lm_head(hidden[:, prompt_len - 1 : -1])
        return token_logprobs(logits, response_ids, self.sampling.temperature, self.suppress_token_ids)

    def get_logprobs_and_value(self, inputs, response_ids, token_mask, backbone_grad=True):
        """log pi(a_t^i | s_t, a_t^<i) at the sampling temperature (B, R) and V(s_t) (B,), one forward.
        backbone_grad=False (the value warm-up) runs the VLM without autograd: only the value head learns."""
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            hidden = self._hidden(self.policy, inputs, response_ids, token_mask)  # (B, P + R, H)
            logprobs = self._logprobs(self.policy, hidden, response_ids)  # (B, R)
        last_prompt_hidden = hidden[:, inputs["input_ids"].shape[1] - 1]  # (B, H), left padding: column P - 1
        if self.value_stop_grad:  # Eq. 4: the value loss trains the head only, never the backbone
            last_prompt_hidden = last_prompt_hidden.detach()
        return logprobs, self.value_head(last_prompt_hidden.float()).squeeze(-1)

    def get_value(self, inputs):
        """V(s) from the prompt alone (the hidden state at the last prompt token ignores the response)."""
        with rollout.compute_context(self.policy):
            hidden = rollout.base_model(self.policy).model(**inputs, use_cache=False).last_hidden_state
        return self.value_head(hidden[:, -1].detach().float()).squeeze(-1)  # (B,)

    @torch.no_grad()
    def get_reference_logprobs(self, inputs, response_ids, token_mask):
        # the frozen copy sits in a list: not a submodule, so agent.train() leaves it in eval mode
        reference = self.policy if self.reference is None else self.reference[0]
        with self.policy.disable_adapter() if self.reference is None else contextlib.nullcontext():
            hidden = self._hidden(reference, inputs, response_ids, token_mask)  # (B, P + R, H)
            return self._logprobs(reference, hidden, response_ids)


# ---- Stage 4 of the main loop: the PPO update ----
def update(agent, optimizer, batch, advantages, returns, args, tokenizer, value_warmup=False):
    """4. PPO epochs over shuffled minibatches of env steps (Eq. 6: L = L_pol + beta L_KL + alpha L_val).
    Value warm-up: the backbone runs without gradient, so Adam skips the policy's parameters entirely (no
    momentum, no decay). Returns each statistic's mean over every env step of every minibatch and epoch."""
    agent.train()  # LoRA dropout, if asked for, is active in the update only; the rollout ran in eval mode
    trainable, device = [p for p in agent.parameters() if p.requires_grad], agent.device
    old_values, flat_adv, flat_ret = (x.flatten() for x in (batch.values, advantages, returns))  # (T * N,)
    size = len(batch.steps)  # T * N (LOOP: the steps its episodes took)
    names = ("policy_loss", "value_loss", "kl_ref", "old_approx_kl", "approx_kl", "clipfrac")
    stats, skipped_updates = dict.fromkeys(names, 0.0), 0
    if args.policy_loss == "rl4vlm":  # RL4VLM's thought / action split of each stored response, (R_i,) each
        action_masks = [baselines.action_token_mask(tokenizer, step["response_ids"]) for step in batch.steps]
    for epoch in range(args.update_epochs):
        order = torch.randperm(size)
        for start in range(0, size, args.minibatch_size):
            optimizer.zero_grad()
            minibatch = order[start : start + args.minibatch_size]  # LOOP's last one may be shorter
            for micro in minibatch.split(args.micro_batch_size):
                index = micro.tolist()
                inputs, response_ids, token_mask = rollout.collate(  # (b, P), (b, R), (b, R)
                    [batch.steps[i] for i in index], tokenizer.pad_token_id, agent.device)
                length = response_ids.shape[1]
                old_logprobs, ref_logprobs = (rollout.pad_stack([x[i] for i in index], length).to(device)
                                              for x in (batch.logprobs, batch.ref_logprobs))  # (b, R) each
                mb_adv, mb_ret, mb_old_v = (x[micro].to(device) for x in (flat_adv, flat_ret, old_values))

                logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, token_mask,
                                                                backbone_grad=not value_warmup)
                if args.policy_loss == "token":  # VL-DAC, Eq. 3
                    pg_loss = token_ppo_loss(logprobs, old_logprobs, mb_adv, token_mask, args.clip_coef)
                else:  # the RL4VLM baseline: one ratio per step
                    action_mask = rollout.pad_stack([action_masks[i] for i in index], length).to(agent.device)
                    pg_loss = baselines.rl4vlm_ppo_loss(logprobs, old_logprobs, mb_adv, token_mask,
                                                        action_mask, args.thought_coef, args.clip_coef)
                kl_ref = kl_penalty(logprobs, ref_logprobs, token_mask)  # L_KL of Eq. 6
                v_loss = value_loss(values, mb_old_v, mb_ret, args.clip_coef if args.clip_vloss else None)
                # Eq. 6; the value warm-up trains the value head alone
                loss = args.vf_coef * v_loss + (0 if value_warmup else pg_loss + args.kl_beta * kl_ref)
                (loss * len(index) / len(minibatch)).backward()  # accumulate: the minibatch mean

                with torch.no_grad():
                    logratio = masked_log_ratio(logprobs, old_logprobs, token_mask)  # (b, R)
                    ratio = logratio.exp()
                    step_stats = dict(policy_loss=pg_loss, value_loss=v_loss, kl_ref=kl_ref,
                                      old_approx_kl=masked_step_mean(-logratio, token_mask).mean(),
                                      approx_kl=masked_step_mean((ratio - 1) - logratio, token_mask).mean(),
                                      clipfrac=masked_step_mean(((ratio - 1).abs() > args.clip_coef).float(),
                                                                token_mask).mean())
                    for key, value in step_stats.items():
                        stats[key] += value.item() * len(index) / (args.update_epochs * size)
            distributed.average_gradients(trainable)  # the same gradient, hence the same step, on every rank
            grad_norm = nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            if not torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip, never reach the weights
                skipped_updates += 1
                continue
            optimizer.step()
    optimizer.zero_grad()  # no non-finite gradient left behind
    return {**stats, "skipped_updates": skipped_updates}


# ---- Set-up: the agent (the flags' defaults and checks: config.py) ----
def make_agent(args, device, built=None):
    """(Agent, processor) for --model-id (vlm.py: LoRA or full, vision tower frozen; a checkpoint's value
    head). built: a (model, processor) made elsewhere, on device (benchmarks), prepared the same way."""
    if built is None:
        policy, processor = vlm.load_policy(args.model_id, device, args.lora_r, args.lora_alpha,
                                            args.lora_dropout, args.env_id, args.bf16)
    else:
        policy = vlm.prepare_policy(built[0], args.lora_r, args.lora_alpha, args.lora_dropout)
        processor = built[1]
    sampling = rollout.sampling_for(policy, device, args.temperature, args.max_new_tokens, args.static_cache,
                                    args.merge_lora_rollout, args.bf16)
    agent = Agent(policy, sampling, args.value_stop_grad)
    value_head = Path(vlm.model_dir(args.model_id)) / "value_head.pt"
    if value_head.exists():  # starting from a vldac checkpoint
        agent.value_head.load_state_dict(torch.load(value_head, map_location=device))
    return agent, processor


def trajectory_writer(args, run_dir, iteration):
    """A rollout.Trajectories for this iteration if --trajectories-every asks for one (rank 0), else None."""
    if RANK != 0 or not args.trajectories_every or iteration % args.trajectories_every:
        return None
    return rollout.Trajectories(run_dir / "trajectories" / f"iter{iteration}", args.env_id)


if __name__ == "__main__":
    args, saved = checkpoint.resume_args(tyro.cli(Args, description=__doc__))  # --resume: the run's own flags
    args = config.resolve_args(args)
    run_name = saved["run_name"] if saved else \
        f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    use_cuda = torch.cuda.is_available() and args.cuda
    distributed.init(use_cuda)
    random.seed(args.seed + RANK)
    np.random.seed(args.seed + RANK)
    torch.manual_seed(args.seed)  # the same on every rank: the same value-head initialisation
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{distributed.LOCAL_RANK}" if use_cuda else "cpu")

    try:  # MiniWorld without a working GL context raises, saying what to install
        env_list = [envs.make_env(args.env_id, args.num_frames, args.text_obs, args.invalid_action_penalty,
                                  args.frame_size, args.reward_shaping) for _ in range(args.num_envs)]
    except RuntimeError as e:
        fail(str(e))
    agent, processor = make_agent(args, device)
    # one Adam group for the policy (LoRA or full) and the value head, as the paper
    trainable = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, eps=1e-5)
    # env i of rank r starts from seed + r * 10^6 + i: ranks far apart, no episode seed repeats across ranks
    runner = rollout.EnvRunner(env_list, args.seed + RANK * 10**6)
    if WORLD_SIZE > 1:
        torch.manual_seed(args.seed + RANK)  # each rank samples its own responses
    runner, global_step, start_iteration = checkpoint.resume(saved, agent, optimizer, runner)  # new run: 0, 1

    # rank 0 logs, from here on (a run that fails to start leaves nothing behind), in a directory of its own
    writer, run_dir = checkpoint.open_writer(args.resume or f"runs/{run_name}", args,
                                             global_step if saved else None)
    run_name, stop = run_dir.name, checkpoint.StopOnSignal()  # Ctrl-C: finish the iteration, checkpoint, exit
    if RANK == 0:  # LOOP's number of iterations depends on its episodes' lengths: no count to print (`of`)
        shape, of = ((f"{args.num_iterations} iterations of {args.batch_size} env steps x {WORLD_SIZE} rank(s)",
                      f"/{args.num_iterations}") if args.baseline != "loop" else
                     (f"LOOP: rollouts of {args.num_envs} whole episodes to {args.total_timesteps} env steps", ""))
        print(f"{run_name}: {sum(p.numel() for p in trainable):,} trainable parameters (vision frozen), "
              f"{shape} on {device}; logs: tensorboard --logdir {run_dir.parent}", flush=True)

    start_step, start_time = global_step, time.time()
    for iteration in range(start_iteration, args.num_iterations + 1):
        if global_step >= args.total_timesteps:  # LOOP only: its rollouts vary in length
            break
        lr = cosine_learning_rate(iteration, args, global_step)
        optimizer.param_groups[0]["lr"] = lr

        if args.baseline == "loop":  # the critic-free baseline replaces stages 1-3 (loop_rollout)
            batch, advantages, returns = baselines.loop_rollout(runner, agent, processor, args,
                                                                trajectory_writer(args, run_dir, iteration))
        else:
            # 1. Rollout: num_envs envs x num_steps env steps; per step one batched generate and one scoring
            #    forward giving log pi_old per token (at temperature T), V_old(s_t) and log pi_ref per token
            batch = runner.collect(agent, processor, args.num_steps,
                                   trajectory_writer(args, run_dir, iteration))

            # 2. GAE over ENV STEPS (one value per step, not per token); truncated episodes bootstrap
            advantages, returns = compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated,
                                              batch.bootstrap_values, batch.last_values, args.gamma,
                                              args.gae_lambda)

            # 3. Advantages normalised over the whole rollout (all ranks'); returns R_t = A_t + V_old(s_t) raw
            if args.norm_adv:
                advantages = normalize_advantages(advantages)
        global_step += len(batch.steps) * WORLD_SIZE

        # 4. PPO epochs: per-token clipped surrogate (Eq. 3), value loss on the detached head (Eq. 4),
        #    k3 KL to the reference, L = L_pol + beta L_KL + alpha L_val (Eq. 6); value-only warm-up first
        value_warmup = iteration <= args.value_warmup_iters
        stats = update(agent, optimizer, batch, advantages, returns, args, processor.tokenizer, value_warmup)

        # 5. Logging: x-axis = env steps; every statistic over all ranks' env steps and episodes
        # (T * N * ranks,)
        y_pred, y_true = (distributed.all_ranks(x.flatten()).numpy() for x in (batch.values, returns))
        no_critic = np.var(y_true) == 0 or args.vf_coef == 0  # (LOOP has none)
        explained_var = np.nan if no_critic else 1 - np.var(y_true - y_pred) / np.var(y_true)
        stats = {k: v / WORLD_SIZE for k, v in distributed.sum_over_ranks(stats).items()}  # equal steps each
        keys = ("episodic_return", "episodic_length", "success")  # summed over episodes, then averaged
        totals = distributed.sum_over_ranks(dict(
            episodes=len(batch.episodes), parse_failures=batch.parse_failures,
            response_tokens=batch.response_tokens, **{k: sum(e[k] for e in batch.episodes) for k in keys}))
        episodes = int(totals["episodes"])
        per_episode = {"success_rate" if key == "success" else key: totals[key] / episodes
                       for key in keys} if episodes else {}
        charts = dict(learning_rate=lr, SPS=(global_step - start_step) / (time.time() - start_time),
                      parse_failure_rate=totals["parse_failures"] / (len(batch.steps) * WORLD_SIZE),
                      response_tokens=totals["response_tokens"] / WORLD_SIZE,
                      skipped_updates=stats.pop("skipped_updates"), **per_episode)  # the NaN/inf guard's
        if RANK == 0:
            for key, value in charts.items():
                writer.add_scalar(f"charts/{key}", value, global_step)
            for key, value in {**stats, "explained_variance": explained_var}.items():
                writer.add_scalar(f"losses/{key}", value, global_step)
            success, ret = (per_episode.get(key, np.nan) for key in ("success_rate", "episodic_return"))
            print(f"iter {iteration}{of} steps {global_step} SPS {charts['SPS']:.1f} | "
                  f"success {success:.2f} return {ret:.2f} ({episodes} episodes) parse_fail "
                  f"{charts['parse_failure_rate']:.2f} | policy {stats['policy_loss']:.4f} value "
                  f"{stats['value_loss']:.4f} kl_ref {stats['kl_ref']:.4f} clipfrac {stats['clipfrac']:.3f}"
                  + (" (value warm-up) the policy is untrained, and short episodes end first" if value_warmup
                     else ""), flush=True)
            writer.flush()

        # 6. Checkpoint (--resume continues from here): after logging, so a resumed run logs the next step;
        #    after a Ctrl-C (SIGINT / SIGTERM) too, and the run stops
        stopping = stop.requested()
        if stopping or args.checkpoint_every and (iteration % args.checkpoint_every == 0
                                                  or iteration == args.num_iterations):
            checkpoint.save_checkpoint(run_dir / "checkpoint.pt", agent, optimizer, runner, args, run_name,
                                       iteration, global_step)
        if stopping and iteration < args.num_iterations:
            stop.exit(writer, run_dir, iteration, global_step)

    if args.save_model and RANK == 0:
        checkpoint.save_model(Path(args.save_dir or run_dir / "model"), agent, processor, args)
        if args.eval_episodes > 0:  # CleanRL's pattern: evaluate the saved policy, log episodic returns
            evaluate.after_training(agent.policy, processor, args, run_dir, writer)
    for env in runner.envs:
        env.close()
    if RANK == 0:
        writer.close()
    distributed.close()
