# VL-DAC, Vision-Language Decoupled Actor-Critic (Bredis et al., arXiv 2508.04280); spec: ../shared/ALGORITHM.md
"""Credit assignment per ENV STEP (one value, one GAE advantage per step), policy update per TOKEN
(every generated token gets its step's advantage, its own PPO ratio and clip). Run:
    python vldac.py --env-id gym_cards/NumberLine-v0                     # the tiny model, CPU
    python vldac.py --env-id MiniWorld-OneRoom-v0 --model-id Qwen/Qwen2-VL-7B-Instruct   # the paper
    python vldac.py --resume runs/RUN_NAME                               # after a crash
    torchrun --standalone --nproc-per-node 8 vldac.py --env-id ...       # data parallel over 8 GPUs
    python vldac.py --policy-loss rl4vlm --thought-coef 0.5             # the RL4VLM baseline
"""
import copy
import functools
import json
import math
import bisect
import os
import pickle
import random
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from huggingface_hub import constants as hub_constants
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForImageTextToText, AutoProcessor

import envs
import rollout
import tiny_vlm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (random, numpy, torch; env i is seeded seed + i)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available (bf16 weights)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "vldac"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the policy, value head, processor and args at the end of training"""
    save_dir: Optional[str] = None
    """where --save-model writes (default: runs/{run_name}/model)"""
    eval_episodes: int = 50
    """after --save-model, greedy evaluation episodes with evaluate.py (paper: 50); 0 skips it"""
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
    """if toggled, the prompt also states the last frame's content in text (an easier task)"""
    invalid_action_penalty: Optional[float] = None
    """reward added when an answer cannot be parsed (None: none; the env plays a random action anyway)"""

    # Model. None = resolved from PAPER_DEFAULTS (real checkpoints) or TINY_DEFAULTS (--model-id tiny)
    model_id: str = "tiny"
    """`tiny` (built on first use and cached), a hub id, a local directory, or a vldac checkpoint"""
    lora_r: Optional[int] = None
    """LoRA rank, 0 = full fine-tune (paper: 16, Table 6; tiny: 0, it has 1.5M parameters)"""
    lora_alpha: Optional[int] = None
    """LoRA alpha (paper: 32, Table 6)"""
    lora_dropout: float = 0.0
    """LoRA dropout. The paper used 0.1; we default to 0 because dropout in the update makes the PPO
    ratio of the first epoch noisy (the rollout scores without dropout); TRL disables dropout in PPO too"""
    temperature: float = 1.0
    """sampling temperature; log-probs are scored at the same temperature (full distribution, no top-k/p)"""
    max_new_tokens: Optional[int] = None
    """response length limit (the authors' code: 256; tiny: 48, its answers take about 17 tokens)"""

    # Algorithm
    total_timesteps: Optional[int] = None
    """total env steps (paper: 51,200, Table 6; tiny: 8,192)"""
    num_envs: Optional[int] = None
    """parallel envs, one batched generate per env step (the authors' code: 1; here 16)"""
    num_steps: Optional[int] = None
    """env steps per env per rollout (the authors' code: 256 env steps per rollout; here 16 x 16; tiny: 16 x 8)"""
    learning_rate: Optional[float] = None
    """Adam learning rate at the start of the cosine schedule (paper: 5e-5, Table 6; tiny: 1e-4, full
    fine-tune: at 5e-4 the first policy step after warm-up drops some token log-probs by 10 nats)"""
    end_learning_rate: Optional[float] = None
    """learning rate at the last iteration (paper: 1e-7, Table 6; tiny: 1e-5)"""
    gamma: Optional[float] = None
    """discount (paper, Table 6: MiniWorld 0.99 (of 0.99/1), EZPoints 1; used for all gym-cards)"""
    gae_lambda: Optional[float] = None
    """GAE lambda over env steps (paper, Table 6: MiniWorld 0.95 (of 0.95/0.99), EZPoints 1)"""
    update_epochs: Optional[int] = None
    """PPO epochs per rollout (paper: 2, Table 6)"""
    minibatch_size: Optional[int] = None
    """env steps per optimizer step (paper: 128 accumulated micro-steps, Table 6; tiny: 64)"""
    micro_batch_size: Optional[int] = None
    """env steps per forward/backward, gradients accumulated over the minibatch (paper: 1; here 4; tiny: 32)"""
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
    """global gradient-norm clip (the authors' code: 0.01; tiny: 1.0)"""

    # Baselines and ablations (benchmarks/ablations.py); the defaults are VL-DAC
    policy_loss: Literal["token", "rl4vlm"] = "token"
    """`token`: VL-DAC, a PPO ratio per generated token (Eq. 3); `rl4vlm`: RL4VLM's one ratio per step on
    thought_coef * log pi(thought tokens) + log pi(action tokens)"""
    thought_coef: float = 0.5
    """RL4VLM's lambda, the weight of the thought tokens (--policy-loss rl4vlm only; RL4VLM: 0.5 on gym-cards,
    0.35 best for Qwen2-VL on OneRoom)"""
    value_stop_grad: bool = True
    """stop-gradient between the value head and the backbone (Eq. 4); --no-value-stop-grad lets the value
    loss train the backbone too (ablation; the warm-up still freezes the backbone)"""

    # filled in at runtime (not command-line flags)
    batch_size: tyro.conf.Suppress[int] = 0
    """env steps per rollout: num_envs * num_steps"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """rollout + update iterations: total_timesteps // batch_size"""


# Table 6 of the paper (and the authors' code where the paper is silent), for real checkpoints.
PAPER_DEFAULTS = dict(total_timesteps=51_200, num_envs=16, num_steps=16, minibatch_size=128, micro_batch_size=4,
                      learning_rate=5e-5, end_learning_rate=1e-7, update_epochs=2, vf_coef=0.15, kl_beta=0.05,
                      value_warmup_iters=2, max_grad_norm=0.01, max_new_tokens=256, lora_r=16, lora_alpha=32)
# The tiny model (1.5M parameters, CPU): full fine-tune, a larger learning rate, short answers. Measured on
# NumberLine: lr 1e-4 reached ~0.8 success by 8k env steps, 3e-4 reached ~0.9 by 4k (README, Status).
TINY_DEFAULTS = dict(total_timesteps=12_288, num_envs=16, num_steps=8, minibatch_size=64, micro_batch_size=32,
                     learning_rate=3e-4, end_learning_rate=3e-5, update_epochs=2, vf_coef=0.15, kl_beta=0.05,
                     value_warmup_iters=2, max_grad_norm=1.0, max_new_tokens=48, lora_r=0, lora_alpha=32)
GAE_DEFAULTS = {"gym_cards": dict(gamma=1.0, gae_lambda=1.0), "MiniWorld": dict(gamma=0.99, gae_lambda=0.95)}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TOWER = ("visual", "vision_tower", "multi_modal_projector")  # parameter-name parts, frozen always


def fail(message):
    """Bad input: one line on stderr, exit code 2 (as argparse/tyro do)."""
    print(f"vldac.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def is_tiny(model_id):
    """`tiny`, a tiny_vlm build directory, or a vldac checkpoint trained from one."""
    if model_id == "tiny" or (Path(model_id) / "tiny_vlm.json").exists():
        return True
    saved_args = Path(model_id) / "args.json"
    return saved_args.exists() and is_tiny(json.loads(saved_args.read_text())["model_id"])


@functools.lru_cache(maxsize=None)
def hub_offline():
    """True when the hub cannot be reached: a 3 s check instead of from_pretrained's minutes of retries."""
    if hub_constants.HF_HUB_OFFLINE:
        return True
    try:
        socket.create_connection((urlparse(hub_constants.ENDPOINT).hostname, 443), timeout=3).close()
        return False
    except OSError:
        return True


def load_policy(model_id, device="cpu", lora_r=0, lora_alpha=32, lora_dropout=0.0):
    """(model, processor) for `tiny`, a local directory, a hub id, or a vldac checkpoint (full weights,
    or a peft adapter directory whose base is loaded first). The vision tower is frozen; with lora_r > 0
    a LoRA adapter is put on the language model's projections (a loaded adapter keeps its own)."""
    path = tiny_vlm.tiny_model_path() if model_id == "tiny" else model_id
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def local_only(name):  # a local directory, or the hub cache when the hub cannot be reached
        return Path(name).exists() or hub_offline()

    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_only(path))
        if (Path(path) / "adapter_config.json").exists():
            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, local_files_only=local_only(base))
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=local_only(path))
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"cannot load --model-id {model_id!r} ({reason}); offline? use --model-id tiny or a local path")
    for name, param in model.named_parameters():
        if any(part in name for part in VISION_TOWER):
            param.requires_grad_(False)
    if lora_r > 0 and not isinstance(model, PeftModel):
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)  # only the adapter is trainable
    return model.to(device), processor


def base_model(model):
    """The transformers model inside a peft wrapper (its LoRA layers stay active), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def eos_token_ids(model):
    """End-of-turn ids: the generation config's eos (a real checkpoint may list several) and the text config's."""
    eos = base_model(model).generation_config.eos_token_id
    return sorted({*(eos if isinstance(eos, list) else [eos]), model.config.get_text_config().eos_token_id} - {None})


class Agent(nn.Module):
    """The VLM policy, its value head, and the KL reference (the adapter disabled, or a frozen copy)."""

    def __init__(self, policy, temperature, value_stop_grad=True):
        super().__init__()
        self.policy, self.temperature, self.value_stop_grad = policy, temperature, value_stop_grad
        config = base_model(policy).config
        hidden = config.get_text_config().hidden_size
        width = min(3072, 4 * hidden)  # official head: hidden -> 3072 -> 2048 -> 1; narrower for small models
        self.value_head = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width * 2 // 3),
                                        nn.ReLU(), nn.Linear(width * 2 // 3, 1)).to(policy.device)
        # with LoRA the reference is the same network with the adapter disabled: no second copy in memory
        self.reference = None if isinstance(policy, PeftModel) else [copy.deepcopy(policy).eval().requires_grad_(False)]
        self.suppress_token_ids = tiny_vlm.vision_token_ids(config)  # generated, they break the next forward
        self.eos_token_ids = eos_token_ids(policy)

    @property
    def device(self):
        return self.policy.device

    def _hidden(self, model, inputs, response_ids, token_mask):
        """Last-layer hidden states over prompt + response, (B, P + R, H)."""
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], response_ids], 1)  # (B, P + R)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], token_mask.long()], 1)
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(response_ids)], 1)
        return base_model(model).model(**full, use_cache=False).last_hidden_state

    def _logprobs(self, model, hidden, response_ids):
        prompt_len = hidden.shape[1] - response_ids.shape[1]
        logits = base_model(model).lm_head(hidden[:, prompt_len - 1 : -1])  # (B, R, V): position j predicts j + 1
        return token_logprobs(logits, response_ids, self.temperature, self.suppress_token_ids)

    def get_logprobs_and_value(self, inputs, response_ids, token_mask, policy_grad=True):
        """log pi(a_t^i | s_t, a_t^<i) at the sampling temperature (B, R) and V(s_t) (B,), one forward."""
        with torch.set_grad_enabled(policy_grad and torch.is_grad_enabled()):
            hidden = self._hidden(self.policy, inputs, response_ids, token_mask)  # (B, P + R, H)
            logprobs = self._logprobs(self.policy, hidden, response_ids)  # (B, R)
        last_prompt_hidden = hidden[:, inputs["input_ids"].shape[1] - 1]  # (B, H), left padding: column P - 1
        if self.value_stop_grad:  # Eq. 4: the value loss trains the head only, never the backbone
            last_prompt_hidden = last_prompt_hidden.detach()
        return logprobs, self.value_head(last_prompt_hidden.float()).squeeze(-1)

    def get_value(self, inputs):
        """V(s) from the prompt alone (the hidden state at the last prompt token ignores the response)."""
        hidden = base_model(self.policy).model(**inputs, use_cache=False).last_hidden_state  # (B, P, H)
        return self.value_head(hidden[:, -1].detach().float()).squeeze(-1)  # (B,)

    @torch.no_grad()
    def get_reference_logprobs(self, inputs, response_ids, token_mask):
        if self.reference is None:
            with self.policy.disable_adapter():
                hidden = self._hidden(self.policy, inputs, response_ids, token_mask)
                return self._logprobs(self.policy, hidden, response_ids)
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
    """Mean over each step's generated tokens, (B, R) -> (B,)."""
    return (x * token_mask).sum(1) / token_mask.sum(1).clamp(min=1)


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
    every_advantage = all_ranks(advantages.flatten())  # (T * N * ranks,)
    return (advantages - every_advantage.mean()) / (every_advantage.std() + 1e-8)


def policy_loss(logprobs, old_logprobs, advantages, token_mask, clip_coef):
    """Eq. 3: per-token clipped surrogate, every token weighted by its step's advantage; mean over each
    step's tokens, then over steps."""
    ratio = (logprobs - old_logprobs).exp()  # (B, R)
    pg_loss1 = -advantages[:, None] * ratio
    pg_loss2 = -advantages[:, None] * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    return masked_step_mean(torch.max(pg_loss1, pg_loss2), token_mask).mean()


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
    weights = torch.where(action_mask, 1.0, thought_coef) * token_mask  # (B, R)
    return (logprobs * weights).sum(1)


def rl4vlm_policy_loss(logprobs, old_logprobs, advantages, token_mask, action_mask, thought_coef, clip_coef):
    """The RL4VLM baseline: ONE clipped PPO ratio per step, on the lambda-weighted summed log-prob."""
    logratio = (rl4vlm_logprob(logprobs, token_mask, action_mask, thought_coef)
                - rl4vlm_logprob(old_logprobs, token_mask, action_mask, thought_coef))  # (B,)
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    return torch.max(pg_loss1, pg_loss2).mean()


def kl_penalty(logprobs, ref_logprobs, token_mask):
    """k3 estimate of KL(pi || pi_ref) per token, mean over each step's tokens, then over steps."""
    log_ref_ratio = ref_logprobs - logprobs  # (B, R)
    return masked_step_mean(log_ref_ratio.exp() - log_ref_ratio - 1, token_mask).mean()


def value_loss(values, old_values, returns, clip_coef=None):
    """Eq. 4: 1/2 (V(s_t) - R_t)^2, optionally clipped around V_old (the authors' code)."""
    v_loss = (values - returns) ** 2
    if clip_coef is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    return 0.5 * v_loss.mean()


def update(agent, optimizer, batch, advantages, returns, args, tokenizer, value_only=False):
    """4. PPO epochs over shuffled minibatches of env steps (Eq. 6: L = L_pol + beta L_KL + alpha L_val).
    Value-only warm-up: the backbone runs without gradient, so policy parameters get no grad, and Adam
    skips them entirely (no momentum, no decay). Returns each statistic averaged over every env step
    of every minibatch and epoch, with the loss's token mask."""
    agent.train()  # LoRA dropout, if asked for, is active in the update only; the rollout ran in eval mode
    trainable = [p for p in agent.parameters() if p.requires_grad]
    old_values, flat_adv, flat_ret = batch.values.flatten(), advantages.flatten(), returns.flatten()  # (T * N,)
    stats = dict.fromkeys(["policy_loss", "value_loss", "kl_ref", "old_approx_kl", "approx_kl", "clipfrac"], 0.0)
    skipped_updates = 0
    for epoch in range(args.update_epochs):
        order = torch.randperm(args.batch_size)
        for start in range(0, args.batch_size, args.minibatch_size):
            optimizer.zero_grad()
            for micro in order[start : start + args.minibatch_size].split(args.micro_batch_size):
                index = micro.tolist()
                inputs, response_ids, token_mask = rollout.collate(
                    [batch.steps[i] for i in index], tokenizer.pad_token_id, agent.device)  # (b, P), (b, R), (b, R)
                length = response_ids.shape[1]
                old_logprobs = rollout.pad_stack([batch.logprobs[i] for i in index], length).to(agent.device)
                ref_logprobs = rollout.pad_stack([batch.ref_logprobs[i] for i in index], length).to(agent.device)
                mb_adv, mb_ret, mb_old_v = (x[micro].to(agent.device) for x in (flat_adv, flat_ret, old_values))

                logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, token_mask,
                                                                policy_grad=not value_only)
                if args.policy_loss == "token":  # VL-DAC, Eq. 3
                    pg_loss = policy_loss(logprobs, old_logprobs, mb_adv, token_mask, args.clip_coef)
                else:  # the RL4VLM baseline
                    action_mask = rollout.pad_stack([action_token_mask(tokenizer, batch.steps[i]["response_ids"])
                                                     for i in index], length).to(agent.device)  # (b, R)
                    pg_loss = rl4vlm_policy_loss(logprobs, old_logprobs, mb_adv, token_mask, action_mask,
                                                 args.thought_coef, args.clip_coef)
                kl_ref = kl_penalty(logprobs, ref_logprobs, token_mask)
                v_loss = value_loss(values, mb_old_v, mb_ret, args.clip_coef if args.clip_vloss else None)  # Eq. 4
                loss = args.vf_coef * v_loss if value_only else pg_loss + args.kl_beta * kl_ref + args.vf_coef * v_loss
                (loss * len(index) / args.minibatch_size).backward()  # accumulate: the minibatch mean

                with torch.no_grad():
                    logratio = logprobs - old_logprobs  # (b, R)
                    ratio = logratio.exp()
                    step_stats = dict(policy_loss=pg_loss, value_loss=v_loss, kl_ref=kl_ref,
                                      old_approx_kl=masked_step_mean(-logratio, token_mask).mean(),
                                      approx_kl=masked_step_mean((ratio - 1) - logratio, token_mask).mean(),
                                      clipfrac=masked_step_mean(((ratio - 1).abs() > args.clip_coef).float(),
                                                               token_mask).mean())
                    for key, value in step_stats.items():
                        stats[key] += value.item() * len(index) / (args.update_epochs * args.batch_size)
            average_gradients(trainable)  # data parallel: the same gradient, hence the same step, on every rank
            grad_norm = nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            if not torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip, never let it reach the weights
                skipped_updates += 1
                continue
            optimizer.step()
    optimizer.zero_grad()  # no non-finite gradient left behind
    return {**stats, "skipped_updates": skipped_updates}


def make_agent(args, device):
    """The policy named by --model-id (LoRA or full, vision tower frozen) as an Agent, and its processor.
    A vldac checkpoint brings its value head along."""
    policy, processor = load_policy(args.model_id, device, args.lora_r, args.lora_alpha, args.lora_dropout)
    agent = Agent(policy, args.temperature, args.value_stop_grad)
    if (Path(args.model_id) / "value_head.pt").exists():  # starting from a vldac checkpoint
        agent.value_head.load_state_dict(torch.load(Path(args.model_id) / "value_head.pt", map_location=device))
    return agent, processor


def cosine_learning_rate(iteration, args):
    """Table 6: cosine decay from learning_rate (iteration 1) to end_learning_rate (the last iteration)."""
    progress = (iteration - 1) / max(1, args.num_iterations - 1)  # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return args.end_learning_rate + (args.learning_rate - args.end_learning_rate) * cosine


def resolve_args(args):
    """Model-dependent defaults, derived sizes and flag checks, in one place (None -> a default)."""
    if args.env_id not in envs.ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    family = "gym_cards" if args.env_id in envs.CARD_IDS else "MiniWorld"
    defaults = {**(TINY_DEFAULTS if is_tiny(args.model_id) else PAPER_DEFAULTS), **GAE_DEFAULTS[family]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // (args.batch_size * WORLD_SIZE)  # torchrun: every rank rolls out
    for name in ("num_envs", "num_steps", "minibatch_size", "micro_batch_size", "update_epochs", "max_new_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.minibatch_size > args.batch_size or args.batch_size % args.minibatch_size:
        fail(f"--minibatch-size {args.minibatch_size} must divide num_envs * num_steps = {args.batch_size}")
    if args.minibatch_size % args.micro_batch_size:
        fail(f"--micro-batch-size {args.micro_batch_size} must divide --minibatch-size {args.minibatch_size}")
    if args.checkpoint_every < 0:
        fail(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.num_iterations < 1:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
             f"({args.batch_size * WORLD_SIZE} env steps over {WORLD_SIZE} rank(s))")
    if args.thought_coef < 0:
        fail(f"--thought-coef must be >= 0, got {args.thought_coef}")
    if args.temperature <= 0:
        fail(f"--temperature must be > 0 (sampling from the policy), got {args.temperature}")
    return args


# Data parallel (torchrun sets these): each rank rolls out its own envs, gradients and statistics are averaged
# over ranks. Without torchrun this is rank 0 of 1 and the helpers below return their input.
RANK, LOCAL_RANK, WORLD_SIZE = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))


def communicable(x):
    """A copy of x that the backend can send: nccl takes GPU tensors only, gloo CPU tensors as they are."""
    return x.to(f"cuda:{LOCAL_RANK}") if dist.get_backend() == "nccl" else x.clone()


def all_ranks(x):
    """x (n, ...) of every rank, concatenated in rank order, (n * WORLD_SIZE, ...)."""
    if WORLD_SIZE == 1:
        return x
    y = communicable(x)
    parts = [torch.empty_like(y) for _ in range(WORLD_SIZE)]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def sum_over_ranks(x):
    if WORLD_SIZE == 1:
        return x
    y = communicable(x)
    dist.all_reduce(y)
    return y.to(x.device)


def average_gradients(params):
    """What DDP would do, by hand: DDP hooks a module's forward(), and ours runs generate() and a scoring
    forward of the inner model instead. One all-reduce of the flattened gradients (LoRA: a few MB)."""
    grads = [p.grad for p in params if p.grad is not None]
    if WORLD_SIZE == 1 or not grads:
        return
    flat = sum_over_ranks(torch.cat([g.flatten() for g in grads])) / WORLD_SIZE
    for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))


def save(path, agent, processor, args):
    """A directory from_pretrained loads (peft adapter or full weights) + value_head.pt + processor + args."""
    path.mkdir(parents=True, exist_ok=True)
    agent.policy.save_pretrained(path)
    processor.save_pretrained(path)
    torch.save(agent.value_head.state_dict(), path / "value_head.pt")
    (path / "args.json").write_text(json.dumps(asdict(args), indent=2))


def save_checkpoint(path, agent, optimizer, runner, args, run_name, iteration, global_step):
    """Everything a run needs to continue: trainable weights (LoRA or full, value head), Adam, the RNG
    states, the env runner, the counters. Written to a temp file, then renamed over the last checkpoint, so
    a kill at any moment leaves the previous complete checkpoint or the new one, never half of one."""
    try:  # the envs mid-episode; MiniWorld's GL envs do not pickle: a resumed run starts new episodes there
        runner_state = pickle.dumps(runner)
    except (TypeError, AttributeError, pickle.PicklingError):
        runner_state = None
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    per_rank = [dict(runner=runner_state, rng=rng)]  # envs and RNGs differ per rank; rank 0 writes them all
    if WORLD_SIZE > 1:
        per_rank = [None] * WORLD_SIZE
        dist.all_gather_object(per_rank, dict(runner=runner_state, rng=rng))
    if RANK != 0:
        return
    state = dict(args=asdict(args), run_name=run_name, iteration=iteration, global_step=global_step,
                 trainable={n: p.detach().cpu() for n, p in agent.named_parameters() if p.requires_grad},
                 optimizer=optimizer.state_dict(), per_rank=per_rank)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX


def load_checkpoint(run_dir):
    """The last checkpoint of a run directory (a pickle: load only checkpoints you wrote)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        fail(f"--resume {run_dir!r} is not a vldac run directory: no checkpoint.pt in it (see --checkpoint-every)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"--resume {run_dir!r}: cannot read checkpoint.pt ({type(e).__name__}: {str(e).splitlines()[0]})")
    if len(checkpoint["per_rank"]) != WORLD_SIZE:
        fail(f"--resume {run_dir!r}: the run had {len(checkpoint['per_rank'])} rank(s), resume it with as many")
    return checkpoint


def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint:  # the run continues with its own flags
        args = replace(Args(**checkpoint["args"]), resume=args.resume)
    args = resolve_args(args)
    run_name = checkpoint["run_name"] if checkpoint else \
        f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume or f"runs/{run_name}")
    use_cuda = torch.cuda.is_available() and args.cuda
    if WORLD_SIZE > 1:  # launched by torchrun: one process per GPU (nccl), or per share of the CPU (gloo)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if args.track and RANK == 0:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = None  # rank 0 logs; resuming, TensorBoard hides what the crashed run logged after its checkpoint
    if RANK == 0:
        writer = SummaryWriter(str(run_dir), purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
    if RANK == 0 and not checkpoint:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))

    random.seed(args.seed + RANK)
    np.random.seed(args.seed + RANK)
    torch.manual_seed(args.seed)  # the same on every rank: the same value-head initialisation
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device(f"cuda:{LOCAL_RANK}" if use_cuda else "cpu")

    try:
        env_list = [envs.make_env(args.env_id, num_frames=args.num_frames, text_obs=args.text_obs,
                                  invalid_action_penalty=args.invalid_action_penalty, frame_size=args.frame_size)
                    for _ in range(args.num_envs)]
    except RuntimeError as e:  # MiniWorld without a working GL context: the message says what to install
        fail(str(e))
    agent, processor = make_agent(args, device)
    # one Adam group for the policy (LoRA or full) and the value head, as the paper
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    # env i of rank r starts from seed + r * 10^6 + i: ranks far apart, so no episode seed repeats across ranks
    runner = rollout.EnvRunner(env_list, args.seed + RANK * 10**6)
    if WORLD_SIZE > 1:
        torch.manual_seed(args.seed + RANK)  # each rank samples its own responses
    global_step, start_iteration = 0, 1
    if checkpoint:  # weights, Adam, RNG and envs as they were after update `iteration`; the next one follows
        agent.load_state_dict(checkpoint["trainable"], strict=False)
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng(checkpoint["per_rank"][RANK]["rng"])
        if checkpoint["per_rank"][RANK]["runner"] is not None:
            for env in env_list:  # replaced by the checkpoint's envs, mid-episode
                env.close()
            runner = pickle.loads(checkpoint["per_rank"][RANK]["runner"])
            env_list = runner.envs
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        print(f"resumed {run_dir} after iteration {checkpoint['iteration']} ({global_step} env steps)", flush=True)
    if RANK == 0:
        print(f"{run_name}: {sum(p.numel() for p in agent.parameters() if p.requires_grad):,} trainable parameters, "
              f"{args.num_iterations} iterations of {args.batch_size} env steps x {WORLD_SIZE} rank(s) on {device}",
              flush=True)

    start_step, start_time = global_step, time.time()
    for iteration in range(start_iteration, args.num_iterations + 1):
        lr = cosine_learning_rate(iteration, args)
        optimizer.param_groups[0]["lr"] = lr

        # 1. Rollout: num_envs envs x num_steps env steps; per step one batched generate and one scoring
        #    forward giving log pi_old per token (at temperature T), V_old(s_t) and log pi_ref per token
        batch = runner.collect(agent, processor, args.num_steps, args.temperature, args.max_new_tokens)
        global_step += args.batch_size * WORLD_SIZE

        # 2. GAE over ENV STEPS (one value per step, never per token); truncations bootstrap, terminals do not
        advantages, returns = compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated,
                                          batch.bootstrap_values, batch.last_values, args.gamma, args.gae_lambda)

        # 3. Advantage normalisation over the whole rollout (all ranks'); returns R_t = A_t + V_old(s_t) stay raw
        if args.norm_adv:
            advantages = normalize_advantages(advantages)

        # 4. PPO epochs: per-token clipped surrogate (Eq. 3), value loss on the detached head (Eq. 4),
        #    k3 KL to the reference, L = L_pol + beta L_KL + alpha L_val (Eq. 6); value-only warm-up first
        warmup = iteration <= args.value_warmup_iters
        stats = update(agent, optimizer, batch, advantages, returns, args, processor.tokenizer, value_only=warmup)

        # 5. Logging: x-axis = env steps; every statistic over all ranks' env steps and episodes
        y_pred, y_true = all_ranks(batch.values.flatten()).numpy(), all_ranks(returns.flatten()).numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        stats = dict(zip(stats, (sum_over_ranks(torch.tensor(list(stats.values()), dtype=torch.float64))
                                 / WORLD_SIZE).tolist()))  # each rank's mean over as many env steps
        episodes = torch.tensor([[e["episodic_return"], e["episodic_length"], e["success"]] for e in batch.episodes],
                                dtype=torch.float64).reshape(-1, 3)  # (episodes, 3)
        sums = sum_over_ranks(torch.cat([episodes.sum(0), torch.tensor(
            [len(episodes), batch.parse_failures, batch.response_tokens], dtype=torch.float64)])).tolist()
        num_episodes = int(sums[3])
        episodic_return, episodic_length, success = (x / num_episodes if num_episodes else float("nan")
                                                     for x in sums[:3])
        parse_failure_rate, response_tokens = sums[4] / (args.batch_size * WORLD_SIZE), sums[5] / WORLD_SIZE
        sps = (global_step - start_step) / (time.time() - start_time)
        if RANK == 0:
            writer.add_scalar("charts/learning_rate", lr, global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/parse_failure_rate", parse_failure_rate, global_step)
            writer.add_scalar("charts/response_tokens", response_tokens, global_step)
            if num_episodes:
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)
                writer.add_scalar("charts/success_rate", success, global_step)
            writer.add_scalar("charts/skipped_updates", stats.pop("skipped_updates"), global_step)  # NaN/inf guard
            for key, value in stats.items():
                writer.add_scalar(f"losses/{key}", value, global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            print(f"iter {iteration}/{args.num_iterations} steps {global_step} SPS {sps:.1f} | success {success:.2f} "
                  f"return {episodic_return:.2f} ({num_episodes} episodes) parse_fail {parse_failure_rate:.2f} | "
                  f"policy {stats['policy_loss']:.4f} value {stats['value_loss']:.4f} kl_ref {stats['kl_ref']:.4f} "
                  f"clipfrac {stats['clipfrac']:.3f}" + (" (value warm-up)" if warmup else ""), flush=True)
            writer.flush()

        # 6. Checkpoint (--resume continues from here): after logging, so a resumed run logs the next step
        if args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations):
            save_checkpoint(run_dir / "checkpoint.pt", agent, optimizer, runner, args, run_name, iteration, global_step)

    if args.save_model and RANK == 0:
        path = Path(args.save_dir or run_dir / "model")
        save(path, agent, processor, args)
        print(f"model saved to {path}")
        if args.eval_episodes > 0:  # CleanRL's pattern: evaluate the saved policy, log episodic returns
            import evaluate

            result = evaluate.evaluate(agent.policy, processor, args.env_id, num_episodes=args.eval_episodes,
                                       max_new_tokens=args.max_new_tokens, seed=args.seed + 10_000)
            for k, episode in enumerate(result["episodes"]):
                writer.add_scalar("eval/episodic_return", episode["episodic_return"], k)
            print(f"eval: success {result['success_rate']:.2f} over {args.eval_episodes} episodes", flush=True)
    for env in env_list:
        env.close()
    if RANK == 0:
        writer.close()
    if WORLD_SIZE > 1:
        dist.destroy_process_group()
