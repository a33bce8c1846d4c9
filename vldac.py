# VL-DAC, Vision-Language Decoupled Actor-Critic (Bredis et al., arXiv 2508.04280); docs/algorithm.md explains it
"""Credit assignment per ENV STEP (one value, one GAE advantage per step), policy update per TOKEN
(every generated token gets its step's advantage, its own PPO ratio and clip). Run:
    python vldac.py --env-id gym_cards/NumberLine-v0                     # the tiny model, CPU
    python vldac.py --env-id MiniWorld-OneRoom-v0 --model-id Qwen/Qwen2-VL-7B-Instruct   # the paper
    python vldac.py --resume runs/RUN_NAME                               # after a crash
    torchrun --standalone --nproc-per-node 8 vldac.py --env-id ...       # data parallel over 8 GPUs
"""
import copy
import importlib.util
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
import distributed
import envs
import evaluate
import rollout
from distributed import RANK, WORLD_SIZE
from vlm import fail, is_tiny, load_policy, model_dir, prepare_policy


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
    """bf16 weights and bf16 autocast, the TRAINABLE weights and Adam's state kept in fp32 (None: on CUDA only)"""
    static_cache: Optional[bool] = None
    """decode with transformers' static KV cache, which it compiles on CUDA (torch.compile + CUDA graphs; the first
    rollout compiles, about a minute for a 2B model). None: on CUDA with LoRA (a full fine-tune under bf16 autocast
    has fp32 embeddings, and its eager prefill and compiled decoding steps disagree on the cache's dtype). The
    log-probs always come from the scoring forward, whichever way the tokens were sampled"""
    merge_lora_rollout: bool = False
    """decode with the LoRA adapter merged into the weights, restored bit for bit from a copy after each generate:
    one matrix product per layer instead of three (2B layout, H100, batch 64: 7.1-8.3 instead of 9.6 ms per decoding
    step), at the cost of merging and restoring per generate and of a copy of the adapted weights (2.6 GB at 2B,
    13 GB at 7B). With 48-token answers the rollout took as long either way; it pays off for longer answers"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "vldac"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = True
    """save the policy, value head, processor and args at the end (runs/{run_name}/model; evaluate.py loads it)"""
    save_dir: Optional[str] = None
    """where --save-model writes (default: runs/{run_name}/model)"""
    trajectories_every: int = 0
    """every N iterations, write that rollout's steps (prompt, answer, action, reward, frames as PNG) to
    runs/{run_name}/trajectories/iter{N} in evaluate.py's --save-trajectories format; 0: never"""
    eval_episodes: int = 50
    """after --save-model, greedy evaluation episodes (paper: 50), 2 recorded as GIFs in the run; 0 skips it"""
    threads: int = 1
    """torch CPU threads, 0: one per core. On 2 cores 2 threads are 1.7x faster if idle, 2x slower if busy (README)"""
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
    """if toggled, the prompt also states the last frame's content in text (the tiny model was not taught it)"""
    invalid_action_penalty: Optional[float] = None
    """reward added when an answer cannot be parsed (None: none; the env plays a random action anyway)"""
    reward_shaping: float = 0.0
    """MiniWorld only, NOT the paper (a diagnostic; 0 = its sparse reward): each step also earns Phi(s') - Phi(s),
    Phi = -c (metres to the red box + degrees off its bearing / 100); c = 0.3 pays about 0.045 per step towards it.
    Success is still the env's. It tells a learner that cannot learn from a dense reward from a reward too sparse"""

    # Model. None = the model's defaults table below: PAPER_DEFAULTS, or TINY_DEFAULTS for --model-id tiny
    model_id: str = "tiny"
    """`tiny` (the shipped one for --env-id, models/), a hub id, a local directory, or a vldac checkpoint"""
    lora_r: Optional[int] = None
    """LoRA rank, 0 = full fine-tune (paper: 16, Table 6; None: the defaults table)"""
    lora_alpha: Optional[int] = None
    """LoRA alpha (paper: 32, Table 6; None: the defaults table)"""
    lora_dropout: float = 0.0
    """LoRA dropout (paper: 0.1; 0 here, as in TRL's PPO: the rollout scores without it, the ratio would be noisy)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are scored at the same temperature (full distribution, no top-k/p)"""
    max_new_tokens: Optional[int] = None
    """response length limit (the authors' code: 256; None: the defaults table)"""

    # Algorithm
    total_timesteps: Optional[int] = None
    """total env steps (paper: 51,200, Table 6; None: the defaults table)"""
    num_envs: Optional[int] = None
    """parallel envs, one batched generate per env step (the authors' code: 1; None: the defaults table). On a GPU a
    decoding step costs little more for many rows than for one (it is bound by per-step overhead, not arithmetic:
    docs/gpu.md), so for a fixed rollout size more envs with fewer steps each is faster"""
    num_steps: Optional[int] = None
    """env steps per env per rollout (the authors' code: 256 steps of 1 env; None: the defaults table). The price
    of few: each env's last steps get GAE advantages that lean on the critic's V(s_T) (bootstrapping) rather than
    on observed rewards, and an episode longer than num_steps (MiniWorld's: up to 128) spans several rollouts"""
    learning_rate: Optional[float] = None
    """Adam learning rate at the start of the cosine schedule (paper: 5e-5, Table 6; None: the defaults table)"""
    end_learning_rate: Optional[float] = None
    """learning rate at the last iteration (paper: 1e-7, Table 6; None: the defaults table)"""
    gamma: Optional[float] = None
    """discount (paper, Table 6: MiniWorld 0.99, EZPoints 1; None: GAE_DEFAULTS)"""
    gae_lambda: Optional[float] = None
    """GAE lambda over env steps (paper, Table 6: MiniWorld 0.95, EZPoints 1; None: GAE_DEFAULTS)"""
    update_epochs: Optional[int] = None
    """PPO epochs per rollout (paper: 2, Table 6; None: the defaults table)"""
    minibatch_size: Optional[int] = None
    """env steps per optimizer step (paper: 128, Table 6; None: the defaults table)"""
    micro_batch_size: Optional[int] = None
    """env steps per forward/backward, gradients accumulated over the minibatch (the authors' code: 1)"""
    norm_adv: bool = True
    """normalise advantages over the rollout (the authors' code)"""
    clip_coef: float = 0.1
    """PPO clip epsilon, per token (the authors' code: 0.1)"""
    clip_vloss: bool = True
    """clip the value update around V_old with clip_coef (the authors' code)"""
    vf_coef: Optional[float] = None
    """value loss coefficient alpha, Eq. 6 (paper: 0.15, Table 6; None: the defaults table)"""
    kl_beta: Optional[float] = None
    """per-token k3 KL penalty to the reference policy, Eq. 6 (paper: 0.05, Table 6; None: the defaults table)"""
    value_warmup_iters: Optional[int] = None
    """first updates train the value head only ("policy freeze"; paper: 2, Table 6; None: the defaults table)"""
    max_grad_norm: Optional[float] = None
    """global gradient-norm clip (the authors' code: 0.01; None: the defaults table)"""

    # Baselines and ablations (benchmarks/ablations.py); the defaults are VL-DAC
    baseline: Literal["vldac", "rl4vlm", "loop"] = "vldac"
    """`rl4vlm`: RL4VLM as published (Zhai et al. 2024): --policy-loss rl4vlm, no KL, no value warm-up, and the
    value loss trains the backbone; `loop`: LOOP (Chen et al. 2025): no critic, whole episodes, K per task, each
    episode's leave-one-out advantage on all its tokens, per-token PPO, no KL. Flags they set take no other value"""
    loop_group_size: int = 4
    """LOOP's K: episodes per group, all from the same env seed (--baseline loop; divides --num-envs)"""
    policy_loss: Literal["token", "rl4vlm"] = "token"
    """`token`: VL-DAC, a PPO ratio per generated token (Eq. 3); `rl4vlm`: RL4VLM's one ratio per step on
    thought_coef * log pi(thought tokens) + log pi(action tokens)"""
    thought_coef: float = 0.5
    """RL4VLM's lambda, the weight of the thought tokens (--policy-loss rl4vlm only; RL4VLM: 0.5 on gym-cards)"""
    value_stop_grad: bool = True
    """stop-gradient between value head and backbone (Eq. 4); --no-value-stop-grad: the value loss trains both"""

    # filled in at runtime (not command-line flags)
    batch_size: tyro.conf.Suppress[int] = 0
    """env steps per rollout: num_envs * num_steps"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """rollout + update iterations: total_timesteps // (batch_size * ranks)"""


# Table 6 of the paper (and the authors' code where the paper is silent), for real checkpoints.
PAPER_DEFAULTS = dict(total_timesteps=51_200, num_envs=16, num_steps=16, minibatch_size=128, micro_batch_size=4,
                      learning_rate=5e-5, end_learning_rate=1e-7, update_epochs=2, vf_coef=0.15, kl_beta=0.05,
                      value_warmup_iters=2, max_grad_norm=0.01, max_new_tokens=256, lora_r=16, lora_alpha=32)
# The tiny model (1.5M parameters, CPU): full fine-tune, a larger learning rate, short answers; 16 Adam steps per
# rollout (4 epochs of 32-step minibatches: at 4, some builds learned too slowly) and beta 0.2 (at 0.05 the extra
# steps wore down the caption probe). Measured: docs/results.md.
TINY_DEFAULTS = dict(total_timesteps=12_288, num_envs=16, num_steps=8, minibatch_size=32, micro_batch_size=32,
                     learning_rate=3e-4, end_learning_rate=3e-5, update_epochs=4, vf_coef=0.15, kl_beta=0.2,
                     value_warmup_iters=2, max_grad_norm=1.0, max_new_tokens=48, lora_r=0, lora_alpha=32)
GAE_DEFAULTS = {"gym_cards": dict(gamma=1.0, gae_lambda=1.0), "MiniWorld": dict(gamma=0.99, gae_lambda=0.95)}
# --baseline presets: what each method changes relative to VL-DAC (LOOP keeps no reference model, no critic)
BASELINES = {"vldac": {}, "rl4vlm": dict(policy_loss="rl4vlm", kl_beta=0.0, value_warmup_iters=0, value_stop_grad=False),
             "loop": dict(kl_beta=0.0, vf_coef=0.0, value_warmup_iters=0)}


def resolve_args(args):
    """Model-dependent defaults (None -> a default), derived sizes, and every flag check before anything is written."""
    if args.env_id not in envs.ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    family = "gym_cards" if args.env_id in envs.CARD_IDS else "MiniWorld"
    for key, value in BASELINES[args.baseline].items():
        if getattr(args, key) is not None and getattr(args, key) != value and key not in ("policy_loss", "value_stop_grad"):
            fail(f"--baseline {args.baseline} sets --{key.replace('_', '-')} {value}; for another value give the "
                 f"flags it stands for instead (see --help)")
        setattr(args, key, value)
    defaults = {**(TINY_DEFAULTS if is_tiny(args.model_id) else PAPER_DEFAULTS), **GAE_DEFAULTS[family]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("num_envs", "num_steps", "minibatch_size", "micro_batch_size", "update_epochs", "max_new_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.batch_size = args.num_envs * args.num_steps
    loop = args.baseline == "loop"  # whole episodes of varying length: stop at total_timesteps (an upper bound here)
    # torchrun: every rank rolls out
    args.num_iterations = args.total_timesteps // (args.num_envs if loop else args.batch_size * WORLD_SIZE)
    if not loop and (args.minibatch_size > args.batch_size or args.batch_size % args.minibatch_size):
        fail(f"--minibatch-size {args.minibatch_size} must divide num_envs * num_steps = {args.batch_size}")
    if args.minibatch_size % args.micro_batch_size:
        fail(f"--micro-batch-size {args.micro_batch_size} must divide --minibatch-size {args.minibatch_size}")
    for name in ("checkpoint_every", "threads", "trajectories_every"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.num_iterations < 1:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
             f"({args.batch_size * WORLD_SIZE} env steps over {WORLD_SIZE} rank(s))")
    if loop and (args.loop_group_size < 2 or args.num_envs % args.loop_group_size):
        fail(f"--loop-group-size must be >= 2 and divide --num-envs {args.num_envs}, got {args.loop_group_size}")
    if loop and WORLD_SIZE > 1:  # ranks would take different numbers of optimizer steps
        fail("--baseline loop runs in one process (its rollouts differ in length between ranks)")
    if args.thought_coef < 0:
        fail(f"--thought-coef must be >= 0, got {args.thought_coef}")
    if args.reward_shaping < 0 or (args.reward_shaping and family != "MiniWorld"):
        fail(f"--reward-shaping must be >= 0 and is for MiniWorld only, got {args.reward_shaping} on {args.env_id}")
    if args.temperature <= 0:
        fail(f"--temperature must be > 0 (sampling from the policy), got {args.temperature}")
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs Weights and Biases: pip install wandb")
    if args.merge_lora_rollout and args.lora_r == 0:
        fail("--merge-lora-rollout needs LoRA (--lora-r > 0): a full fine-tune has no adapter to merge")
    return args


def trajectory_writer(args, run_dir, iteration):
    """An evaluate.Trajectories for this iteration's rollout when --trajectories-every asks for it (rank 0), else None."""
    if RANK != 0 or not args.trajectories_every or iteration % args.trajectories_every:
        return None
    return evaluate.Trajectories(run_dir / "trajectories" / f"iter{iteration}", args.env_id)


def make_agent(args, device, built=None):
    """(Agent, processor) for --model-id (vlm.py: LoRA or full, vision tower frozen; a checkpoint's value head).
    built: a (model, processor) made elsewhere, on device (benchmarks' random layouts), prepared the same way."""
    if built is None:
        policy, processor = load_policy(args.model_id, device, args.lora_r, args.lora_alpha, args.lora_dropout,
                                        args.env_id, args.bf16)
    else:
        policy, processor = prepare_policy(built[0], args.lora_r, args.lora_alpha, args.lora_dropout), built[1]
    static_cache, compiled = args.static_cache, torch.device(device).type == "cuda"  # transformers compiles on CUDA
    if static_cache is None:
        static_cache = compiled and isinstance(policy, PeftModel)
    if static_cache and compiled and args.bf16 is not False and not isinstance(policy, PeftModel):
        fail("--static-cache True on CUDA needs LoRA (--lora-r > 0) or --bf16 False: in a full fine-tune under bf16 "
             "autocast the compiled decoding step writes bf16 keys into the prefill's fp32 cache")
    agent = Agent(policy, args.temperature, args.value_stop_grad, static_cache,
                  args.merge_lora_rollout and isinstance(policy, PeftModel))
    value_head = Path(model_dir(args.model_id)) / "value_head.pt"
    if value_head.exists():  # starting from a vldac checkpoint
        agent.value_head.load_state_dict(torch.load(value_head, map_location=device))
    return agent, processor


def make_value_head(hidden):
    """V_phi (Eq. 4): an MLP on the last prompt token's state. The official head is hidden -> 3072 -> 2048 -> 1;
    for small models the widths shrink with the hidden size (4x, then 2/3 of that)."""
    width = min(3072, 4 * hidden)
    return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width * 2 // 3), nn.ReLU(),
                         nn.Linear(width * 2 // 3, 1))


class Agent(nn.Module):
    """The VLM policy, its value head, and the KL reference (the adapter disabled, or a frozen copy)."""

    def __init__(self, policy, temperature, value_stop_grad=True, static_cache=False, merge_lora=False):
        super().__init__()
        self.policy, self.temperature, self.value_stop_grad = policy, temperature, value_stop_grad
        self.static_cache, self.merge_lora = static_cache, merge_lora  # how the rollout decodes (rollout.generate)
        hidden = rollout.base_model(policy).config.get_text_config().hidden_size
        self.value_head = make_value_head(hidden).to(policy.device)
        # with LoRA the reference is the same network with the adapter disabled: no second copy in memory
        self.reference = None if isinstance(policy, PeftModel) else [copy.deepcopy(policy).eval().requires_grad_(False)]
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
        for key in rollout.TEXT_MARKS:  # text (0) / image (1) marks, if the family has them: the response is text
            if key in inputs:
                full[key] = torch.cat([inputs[key], torch.zeros_like(response_ids)], 1)
        with rollout.compute_context(model):  # bf16 autocast where the weights are bf16 (GPU)
            return rollout.base_model(model).model(**full, use_cache=False).last_hidden_state

    def _logprobs(self, model, hidden, response_ids):
        prompt_len = hidden.shape[1] - response_ids.shape[1]
        with rollout.compute_context(model):
            logits = rollout.base_model(model).lm_head(hidden[:, prompt_len - 1 : -1])  # (B, R, V): j predicts j + 1
        return token_logprobs(logits, response_ids, self.temperature, self.suppress_token_ids)

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
            hidden = rollout.base_model(self.policy).model(**inputs, use_cache=False).last_hidden_state  # (B, P, H)
        return self.value_head(hidden[:, -1].detach().float()).squeeze(-1)  # (B,)

    @torch.no_grad()
    def get_reference_logprobs(self, inputs, response_ids, token_mask):
        if self.reference is None:
            with self.policy.disable_adapter():
                return self._logprobs(self.policy, self._hidden(self.policy, inputs, response_ids, token_mask),
                                      response_ids)
        reference = self.reference[0]  # in a list: not a submodule, so agent.train() leaves it in eval mode
        return self._logprobs(reference, self._hidden(reference, inputs, response_ids, token_mask), response_ids)


def token_logprobs(logits, response_ids, temperature, suppress_token_ids=()):
    """log-softmax of logits / T at the response ids, float32, (B, R). Suppressed tokens are scored
    as generate() samples them: probability 0."""
    logits = logits.float() / temperature  # (B, R, V)
    if len(suppress_token_ids):
        logits = logits.index_fill(-1, torch.tensor(suppress_token_ids, device=logits.device), float("-inf"))
    picked = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
    return picked - logits.logsumexp(-1)


def masked_step_mean(x, token_mask):
    """Mean over each step's generated tokens, (B, R) -> (B,); padding selected away (inf * 0 would be NaN)."""
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
    """Eq. 3: per-token clipped surrogate, each token with its step's advantage; mean per step, then over steps."""
    ratio = masked_log_ratio(logprobs, old_logprobs, token_mask).exp()  # (B, R)
    return masked_step_mean(clipped_surrogate(ratio, advantages[:, None], clip_coef), token_mask).mean()


def kl_penalty(logprobs, ref_logprobs, token_mask):
    """L_KL of Eq. 6: the k3 estimate of KL(pi || pi_ref) per token; mean over each step's tokens, then steps."""
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
    """Table 6: cosine decay from learning_rate (iteration 1) to end_learning_rate (the last iteration). LOOP's
    rollouts (whole episodes) vary in length: it decays over env steps instead."""
    progress = (min(1.0, global_step / args.total_timesteps) if args.baseline == "loop"
                else (iteration - 1) / max(1, args.num_iterations - 1))  # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return args.end_learning_rate + (args.learning_rate - args.end_learning_rate) * cosine


# ---- Baselines (baselines.py): RL4VLM's loss, ONE clipped ratio per env step; LOOP replaces stages 1-3 ----
def rl4vlm_ppo_loss(logprobs, old_logprobs, advantages, token_mask, action_mask, thought_coef, clip_coef):
    """ONE clipped PPO ratio per step, on the lambda-weighted summed log-prob."""
    logratio = (baselines.rl4vlm_logprob(logprobs, token_mask, action_mask, thought_coef)
                - baselines.rl4vlm_logprob(old_logprobs, token_mask, action_mask, thought_coef))  # (B,)
    return clipped_surrogate(logratio.exp(), advantages, clip_coef).mean()


def update(agent, optimizer, batch, advantages, returns, args, tokenizer, value_warmup=False):
    """4. PPO epochs over shuffled minibatches of env steps (Eq. 6: L = L_pol + beta L_KL + alpha L_val).
    Value warm-up: the backbone runs without gradient, so Adam skips the policy's parameters entirely (no
    momentum, no decay). Returns each statistic's mean over every env step of every minibatch and epoch."""
    agent.train()  # LoRA dropout, if asked for, is active in the update only; the rollout ran in eval mode
    trainable = [p for p in agent.parameters() if p.requires_grad]
    old_values, flat_adv, flat_ret = batch.values.flatten(), advantages.flatten(), returns.flatten()  # (T * N,)
    size = len(batch.steps)  # T * N (LOOP: the steps its episodes took)
    stats = dict.fromkeys(["policy_loss", "value_loss", "kl_ref", "old_approx_kl", "approx_kl", "clipfrac"], 0.0)
    skipped_updates = 0
    for epoch in range(args.update_epochs):
        order = torch.randperm(size)
        for start in range(0, size, args.minibatch_size):
            optimizer.zero_grad()
            minibatch = order[start : start + args.minibatch_size]  # LOOP's last one may be shorter
            for micro in minibatch.split(args.micro_batch_size):
                index = micro.tolist()
                inputs, response_ids, token_mask = rollout.collate(
                    [batch.steps[i] for i in index], tokenizer.pad_token_id, agent.device)  # (b, P), (b, R), (b, R)
                length = response_ids.shape[1]
                old_logprobs, ref_logprobs = (rollout.pad_stack([x[i] for i in index], length).to(agent.device)
                                              for x in (batch.logprobs, batch.ref_logprobs))  # (b, R) each
                mb_adv, mb_ret, mb_old_v = (x[micro].to(agent.device) for x in (flat_adv, flat_ret, old_values))

                logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, token_mask,
                                                                backbone_grad=not value_warmup)
                if args.policy_loss == "token":  # VL-DAC, Eq. 3
                    pg_loss = token_ppo_loss(logprobs, old_logprobs, mb_adv, token_mask, args.clip_coef)
                else:  # the RL4VLM baseline
                    action_mask = rollout.pad_stack([baselines.action_token_mask(tokenizer, batch.steps[i]["response_ids"])
                                                     for i in index], length).to(agent.device)  # (b, R)
                    pg_loss = rl4vlm_ppo_loss(logprobs, old_logprobs, mb_adv, token_mask, action_mask,
                                              args.thought_coef, args.clip_coef)
                kl_ref = kl_penalty(logprobs, ref_logprobs, token_mask)  # L_KL of Eq. 6
                v_loss = value_loss(values, mb_old_v, mb_ret, args.clip_coef if args.clip_vloss else None)  # Eq. 4
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
            if not torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip, never let it reach the weights
                skipped_updates += 1
                continue
            optimizer.step()
    optimizer.zero_grad()  # no non-finite gradient left behind
    return {**stats, "skipped_updates": skipped_updates}


if __name__ == "__main__":
    args, saved = checkpoint.resume_args(tyro.cli(Args))  # --resume: the run's own flags and last checkpoint
    args = resolve_args(args)
    run_name = saved["run_name"] if saved else \
        f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume or f"runs/{run_name}")
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
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    # env i of rank r starts from seed + r * 10^6 + i: ranks far apart, so no episode seed repeats across ranks
    runner = rollout.EnvRunner(env_list, args.seed + RANK * 10**6)
    if WORLD_SIZE > 1:
        torch.manual_seed(args.seed + RANK)  # each rank samples its own responses
    runner, global_step, start_iteration = checkpoint.resume(saved, agent, optimizer, runner)  # new run: 0 steps done

    # rank 0 logs, from here on: a run that fails to start leaves nothing behind
    writer = checkpoint.open_writer(run_dir, run_name, args, resumed_step=global_step if saved else None)
    if RANK == 0:
        print(f"{run_name}: {sum(p.numel() for p in agent.parameters() if p.requires_grad):,} trainable parameters "
              f"(vision tower frozen), " + (f"{args.num_iterations} iterations of {args.batch_size} env steps x "
              f"{WORLD_SIZE} rank(s)" if args.baseline != "loop" else f"LOOP: rollouts of {args.num_envs} whole episodes "
              f"to {args.total_timesteps} env steps") + f" on {device}; logs: tensorboard --logdir {run_dir.parent}",
              flush=True)

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
            batch = runner.collect(agent, processor, args.num_steps, args.temperature, args.max_new_tokens,
                                   trajectory_writer(args, run_dir, iteration))

            # 2. GAE over ENV STEPS (one value per step, never per token); truncations bootstrap, terminals do not
            advantages, returns = compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated,
                                              batch.bootstrap_values, batch.last_values, args.gamma, args.gae_lambda)

            # 3. Advantage normalisation over the whole rollout (all ranks'); returns R_t = A_t + V_old(s_t) raw
            if args.norm_adv:
                advantages = normalize_advantages(advantages)
        global_step += len(batch.steps) * WORLD_SIZE

        # 4. PPO epochs: per-token clipped surrogate (Eq. 3), value loss on the detached head (Eq. 4),
        #    k3 KL to the reference, L = L_pol + beta L_KL + alpha L_val (Eq. 6); value-only warm-up first
        value_warmup = iteration <= args.value_warmup_iters
        stats = update(agent, optimizer, batch, advantages, returns, args, processor.tokenizer, value_warmup)

        # 5. Logging: x-axis = env steps; every statistic over all ranks' env steps and episodes
        y_pred, y_true = (distributed.all_ranks(x.flatten()).numpy() for x in (batch.values, returns))  # (T*N*ranks,)
        no_critic = np.var(y_true) == 0 or args.vf_coef == 0  # (LOOP has none)
        explained_var = np.nan if no_critic else 1 - np.var(y_true - y_pred) / np.var(y_true)
        stats = {k: v / WORLD_SIZE for k, v in distributed.sum_over_ranks(stats).items()}  # ranks: as many steps each
        totals = distributed.sum_over_ranks(dict(
            episodes=len(batch.episodes), parse_failures=batch.parse_failures, response_tokens=batch.response_tokens,
            **{key: sum(e[key] for e in batch.episodes) for key in ("episodic_return", "episodic_length", "success")}))
        episodes = int(totals["episodes"])
        per_episode = {"success_rate" if key == "success" else key: totals[key] / episodes
                       for key in ("episodic_return", "episodic_length", "success")} if episodes else {}
        charts = dict(learning_rate=lr, SPS=(global_step - start_step) / (time.time() - start_time),
                      parse_failure_rate=totals["parse_failures"] / (len(batch.steps) * WORLD_SIZE),
                      response_tokens=totals["response_tokens"] / WORLD_SIZE,
                      skipped_updates=stats.pop("skipped_updates"), **per_episode)  # the NaN/inf guard's count
        if RANK == 0:
            for key, value in charts.items():
                writer.add_scalar(f"charts/{key}", value, global_step)
            for key, value in {**stats, "explained_variance": explained_var}.items():
                writer.add_scalar(f"losses/{key}", value, global_step)
            success, ret = (per_episode.get(key, np.nan) for key in ("success_rate", "episodic_return"))
            print(f"iter {iteration}/{args.num_iterations} steps {global_step} SPS {charts['SPS']:.1f} | success "
                  f"{success:.2f} return {ret:.2f} ({episodes} episodes) parse_fail {charts['parse_failure_rate']:.2f}"
                  f" | policy {stats['policy_loss']:.4f} value {stats['value_loss']:.4f} kl_ref {stats['kl_ref']:.4f} "
                  f"clipfrac {stats['clipfrac']:.3f}" + (" (value warm-up)" if value_warmup else ""), flush=True)
            writer.flush()

        # 6. Checkpoint (--resume continues from here): after logging, so a resumed run logs the next step
        if args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations):
            checkpoint.save_checkpoint(run_dir / "checkpoint.pt", agent, optimizer, runner, args, run_name, iteration,
                                       global_step)

    if args.save_model and RANK == 0:
        checkpoint.save_model(Path(args.save_dir or run_dir / "model"), agent, processor, args)
        if args.eval_episodes > 0:  # CleanRL's pattern: evaluate the saved policy, log episodic returns
            evaluate.after_training(agent.policy, processor, args, run_dir, writer)
    for env in runner.envs:
        env.close()
    if RANK == 0:
        writer.close()
    distributed.close()
