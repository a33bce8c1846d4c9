# The tiny VLM: a real Qwen2-VL (same transformers classes as Qwen2-VL-2B/7B-Instruct), built from a
# config, given a few minutes of offline pre-training on our own frames so that it can SEE, then saved
# with save_pretrained and loaded back through the same from_pretrained(path) code as a real checkpoint.
"""A VLM in four parts, each built here from scratch:

1. tokenizer   byte-level BPE trained on our prompts and answers, plus Qwen's special tokens
2. processor   Qwen2VLImageProcessor (frames -> 14 px patches) + tokenizer + a chat template
3. model       Qwen2VLForConditionalGeneration: a ViT (vision tower) whose 2x2-merged patch features
               replace the <|image_pad|> tokens in a small decoder-only language model
4. pre-training  captioning our frames ("Target: 3, Current: 1") and answering our task prompts in
               the JSON format with the caption as thoughts and a UNIFORMLY RANDOM action: the model
               learns to see and to speak the format, never which action is good (that is RL's job).
               MiniWorld and EZPoints answer with an expert's action with probability prior_q instead
               (PriorConfig): a weak prior, as a pretrained VLM starts with (docs/tiny_model.md).

Two choices make a 1.5M-parameter model learn to read digits in a minute instead of never
(docs/tiny_model.md has the measurements, and what failed):
* "ink" normalisation: pixels are normalised so that white is 0 (image_mean 1, image_std 0.5). With
  CLIP's constants a white background is a large constant input and the few pixels of a glyph are a
  7% perturbation of every patch feature; with white = 0 a blank patch is silent and a glyph is all
  the signal. A linear probe on the vision features then learns in 50 steps instead of never.
* an auxiliary probe loss: a linear head on the MEAN of each image's vision features predicts the
  caption tokens. It teaches the vision tower to see before the language model has learned where to
  look (uniform attention over the image tokens is then already informative). The head is dropped
  after pre-training; the saved model is a plain Qwen2-VL. The families after NumberLine read every
  feature in place instead ("flat"): a mean keeps what is in the image, not where.

One model per family of envs (FAMILIES): one model for several games read none of them in the budget.
"""
import os

if __name__ == "__main__":  # a build with 2+ threads beside other work: waiting threads sleep instead of spinning
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (read once, when torch loads OpenMP)

import collections
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

import envs
import rollout

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]  # Qwen's names; ids 0..6 here (151643.. in Qwen2-VL)
# Qwen's chat format, shortened: <|im_start|>role\n content <|im_end|>\n, an image is
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> to one token per
# merged 28x28 patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CAPTION_PROMPT = "Describe the image."
DATA_VERSION = 1  # bump when envs' rendering, prompts or state_text change: the cache key includes it


@dataclass(frozen=True)
class TinyConfig:
    image_size: int = 112  # frames are resized to 112x112 -> 8x8 patches of 14 px -> 16 merged image tokens
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_dim: int = 128
    pretrain_steps: int = 900
    batch_size: int = 32  # captions per step (short sequences: image + a few tokens)
    format_batch_size: int = 4  # task-prompt examples per step (long sequences: the full prompt)
    learning_rate: float = 2e-3
    aux_coef: float = 1.0  # weight of the mean-pooled probe loss
    env_ids: tuple = tuple(envs.CARD_IDS)
    # pre-training mix over env_ids. NumberLine only: with the other games mixed in (0.6/0.13/0.13/0.13,
    # 1000 steps) the model read none of them, NumberLine included, within the budget (see README)
    env_weights: tuple = (1.0, 0.0, 0.0, 0.0)
    seed: int = 0
    state_pool: int = 0  # N > 0: draw N states per env once, then sample them with every caption equally often
    caption_formula: bool = True  # the points games' captions include the formula (only the NumberLine recipe's
    # tokenizer was trained that way; the other recipes caption the cards alone, the prompt states the formula)
    aux_pool: str = "mean"  # the probe reads the mean of an image's features, or "flat": all of them, in place
    # (which card is first, is the box left or right: the mean of the features keeps what, not where)
    # M-RoPE gives each head's rotary pairs to (time, height, width) in that order, i.e. width gets the slowest
    # frequencies. Qwen2-VL's split ([16, 24, 24] / 64, here [4, 6, 6]) at theta 1e4 turns a 5-column MiniWorld
    # frame's columns by < 0.013 rad: left and right are the same to attention. theta 100 with (2, 2, 12) pairs:
    # 0.32 rad per column on the fastest width pair (docs/tiny_model.md)
    rope_theta: float = 10000.0
    mrope_section: tuple = ()  # () = Qwen2-VL's proportions
    # Card games: every sample starts from a new deal. Otherwise the next samples walk on from the last one and
    # share its cards: a batch of 32 Points24 captions held 4-5 deals, and its cards were never read
    fresh_deal: bool = False
    # Two pre-training speed-ups, on for the card families: Adam's fused kernel (one pass over each weight instead
    # of about ten: the flat probe head's 6.3M weights made the unfused step a fifth of a MiniWorld step), and logits
    # only where an answer token comes next (the loss reads no others; a long task prompt has hundreds). Same
    # maths; the rounding differs, so a model built with them is another model (measured: docs/tiny_model.md).
    # Off for NumberLine, whose model stays bit for bit the one its figures were measured with, and for MiniWorld
    fast_pretrain: bool = False
    # No weak prior: every answer's action is uniformly random. A class attribute, not a field, so that the recipes
    # without a prior keep their cards and cache keys; PriorConfig makes it a field
    prior_q = 0.0


@dataclass(frozen=True)
class PriorConfig(TinyConfig):
    """A family whose model starts with a weak prior, as a pretrained VLM starts with some zero-shot competence: each
    task-prompt answer takes the expert's action (envs.expert_action, from the simulator's true state) with
    probability prior_q, a uniformly random valid action otherwise, and the states walk the same way."""

    prior_q: float = 0.0


# One tiny model per family of envs, each pre-trained on its own frames: one model for several games read none
# of them within the budget (docs/tiny_model.md). `--model-id tiny` picks the family of `--env-id`.
_READER = dict(caption_formula=False, aux_pool="flat")
# MiniWorld stays without fast_pretrain: its one build with it read FourRooms less well (docs/tiny_model.md)
_CARDS = dict(_READER, fresh_deal=True, fast_pretrain=True)
# Rotary frequencies that let attention tell image columns apart (TinyConfig.rope_theta, docs/tiny_model.md)
_COLUMNS = dict(rope_theta=100.0, mrope_section=(2, 2, 12))
FAMILIES = {
    "numberline": TinyConfig(),
    # prior_q 0.8: a deal needs four expert symbols in a row, and the model learns only part of the mix (copying a
    # card's rank least): q 0.65 gave p(expert) 0.35, success 0.06; 0.8 gives 0.48, 0.10 (docs/tiny_model.md)
    "ezpoints": PriorConfig(env_ids=("gym_cards/EZPoints-v0",), env_weights=(1.0,), pretrain_steps=400, **_CARDS,
                            format_batch_size=32, prior_q=0.8),
    # four small cards side by side: which is which needs the column rotations too; 1000 steps, as a build of 700
    # read them on one machine (1.000) and not on another (0.160)
    "points24": TinyConfig(env_ids=("gym_cards/Points24-v0",), env_weights=(1.0,), pretrain_steps=1000, **_CARDS,
                           **_COLUMNS),
    "blackjack": TinyConfig(env_ids=("gym_cards/Blackjack-v0",), env_weights=(1.0,), pretrain_steps=400, **_CARDS),
    # where the box is needs fast width rotations. prior_q 0.35: the model learns part of it (p(expert) 0.42, a quarter
    # is chance), and OneRoom's zero-shot success climbs steeply with it (docs/tiny_model.md); 4 task prompts per step
    # (4-frame prompts are long) for the prior to be learned at all; 48 captions: that build read FourRooms 0.940,
    # the one with 32 read 0.880 (one build each)
    "miniworld": PriorConfig(env_ids=tuple(envs.MINIWORLD_IDS), env_weights=(1.0,) * 4, state_pool=4000,
                             batch_size=48, format_batch_size=4, pretrain_steps=1500, **_COLUMNS, **_READER,
                             prior_q=0.35),
}


def family_of(env_id):
    """The name of the tiny model family that reads env_id's frames."""
    if env_id not in envs.ENV_IDS:
        raise ValueError(f"unknown env_id {env_id!r}")
    return next(name for name, cfg in FAMILIES.items() if env_id in envs_read(cfg))


def config_for(env_id) -> TinyConfig:
    return FAMILIES[family_of(env_id)]


def envs_read(cfg: TinyConfig) -> tuple:
    """The envs cfg's model is pre-trained to read (weight > 0)."""
    return tuple(e for e, w in zip(cfg.env_ids, cfg.env_weights) if w > 0)


# ---------------------------------------------------------------------------- 1-3. build
def train_bpe(corpus, vocab_size, special_tokens, **named) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, nothing is <unk>) trained on corpus, as a fast tokenizer; named: its
    eos / pad / extra special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **named)


def build_processor(cfg: TinyConfig, corpus) -> Qwen2VLProcessor:
    """Qwen2-VL's processor with a BPE trained on our own prompts and answers, and the tiny image size."""
    tokenizer = train_bpe(corpus, cfg.vocab_size, SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                "vision_start_token": "<|vision_start|>",
                                                "vision_end_token": "<|vision_end|>"})
    side = cfg.image_size
    image_processor = Qwen2VLImageProcessor(
        image_mean=[1.0, 1.0, 1.0], image_std=[0.5, 0.5, 0.5],  # "ink" normalisation: white -> 0
        # smart_resize keeps the aspect ratio within [min, max] pixels, sides multiples of 28:
        # 300x300 -> 112x112 (16 tokens), MiniWorld 80x60 -> 140x112 (20 tokens)
        size={"shortest_edge": side * side, "longest_edge": (side + 8) ** 2})
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_model(cfg: TinyConfig, tokenizer) -> Qwen2VLForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.num_heads
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=4096,
            # M-RoPE splits each head's rotary pairs (head_dim / 2) over (time, height, width), in order of
            # falling frequency (see TinyConfig.mrope_section)
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": list(
                cfg.mrope_section or [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16])},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=cfg.vision_depth, embed_dim=cfg.vision_dim, hidden_size=cfg.hidden_size,
                           num_heads=cfg.num_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    return Qwen2VLForConditionalGeneration(config)


# ---------------------------------------------------------------------------- 4. data
class StateSampler:
    """States to learn from, as (frames, prompt, caption, actions, answer_of). Without a pool: a few uniformly
    random steps before each sample, from where the last sample left off or, with fresh_deal, from a new deal
    (episode) each time. With pool=N: N states per env drawn once (MiniWorld walks head for the box
    half the time: a random walk rarely comes near it), then sampled with every caption equally often."""

    def __init__(self, env_ids, seed, weights=None, pool=0, caption_formula=True, fresh_deal=False, prior_q=0.0):
        self.rng = np.random.default_rng(seed)
        self.fresh_deal, self.prior_q = fresh_deal, prior_q
        self.envs = [envs.make_env(env_id) for env_id in env_ids]
        self.weights = None if weights is None else np.asarray(weights) / np.sum(weights)
        self.caption_formula = caption_formula
        for env in self.envs:
            env.reset(seed=int(self.rng.integers(2**31)))
        self.pools = [self._draw_pool(env, pool) for env in self.envs] if pool else None

    def sample(self):
        index = self.rng.choice(len(self.envs), p=self.weights)
        if self.pools:
            states, weights = self.pools[index]
            return states[self.rng.choice(len(states), p=weights)]
        env = self.envs[index]
        if self.fresh_deal:
            env.reset(seed=int(self.rng.integers(2**31)))
        for _ in range(int(self.rng.integers(0, 4))):  # a few random steps (the prior's): formulas, hands, moves
            action = prior_choice(envs.expert_action(env), len(env.actions), self.prior_q, self.rng)
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset(seed=int(self.rng.integers(2**31)))
        return self._state(env)

    def _state(self, env):
        return State((list(env.frames), env.prompt(), caption(env, self.caption_formula), env.actions,
                      answer_format(env)), envs.expert_action(env))

    def _draw_pool(self, env, size):
        states, seek = [self._state(env)], isinstance(env, envs.MiniWorldTextEnv)
        while len(states) < size:
            explore = not seek or self.rng.random() < 0.5
            action = int(self.rng.integers(len(env.actions))) if explore else seek_box(env.unwrapped)
            _, _, terminated, truncated, _ = env.step(action)
            states.append(self._state(env))
            if terminated or truncated:
                env.reset(seed=int(self.rng.integers(2**31)))
        counts = collections.Counter(state[2] for state in states)
        weights = np.array([1.0 / counts[state[2]] for state in states])
        return states, weights / weights.sum()


def sampler_of(cfg: TinyConfig, env_ids, seed, weights=None) -> StateSampler:
    """The states cfg's family learns from (and is probed on, from another seed)."""
    return StateSampler(env_ids, seed, weights, cfg.state_pool, cfg.caption_formula, cfg.fresh_deal, cfg.prior_q)


class State(tuple):
    """A state to learn from, (frames, prompt, caption, actions, answer_of), and .expert: the expert's action there
    (envs.expert_action, from the simulator's true state; None where the env has none)."""

    def __new__(cls, fields, expert=None):
        state = super().__new__(cls, fields)
        state.expert = expert
        return state


def prior_choice(expert, num_actions, prior_q, rng):
    """The prior's action: the expert's with probability prior_q (where there is one), else uniformly random. Without
    a prior (or an expert) it draws exactly what the uniformly random action always drew: those recipes' data stays."""
    return expert if prior_q and expert is not None and rng.random() < prior_q else int(rng.integers(num_actions))


def caption(env, formula=True):
    """What the model is taught to say about the newest frame: the env's state_text(), the points games'
    formula left out when formula=False (it is in the prompt)."""
    if not formula and isinstance(env.unwrapped, envs.PointsGame):
        return env.unwrapped.cards_text()
    return env.state_text()


def seek_box(world):
    """MiniWorld action index that heads for the red box (walls ignored, seen or not): for drawing states near it,
    never as an answer (the prior's answers come from envs.miniworld_expert)."""
    angle = envs.box_bearing(world)
    return 2 if abs(angle) <= 10 else (1 if angle > 0 else 0)  # move forward, turn right, turn left


def answer_format(env):
    """How the env's prompt asks for the action: by number (MiniWorld) or by name (gym-cards)."""
    if isinstance(env, envs.MiniWorldTextEnv):
        return lambda thoughts, a: json.dumps({"thoughts": thoughts, "action": a})
    return lambda thoughts, a: json.dumps({"thoughts": thoughts, "action": env.actions[a]})


def caption_example(state):
    """(images, user text, answer): the newest frame and its description."""
    frames, _, caption, _, _ = state
    return frames[-1:], CAPTION_PROMPT, caption


def format_example(state, rng, prior_q=0.0):
    """The task prompt answered in the JSON format: the caption as thoughts and an action drawn uniformly at random,
    or with probability prior_q the expert's (state.expert, where there is one). Without a prior it teaches the
    format, never a policy; with one, a weak hint."""
    frames, prompt, caption, actions, answer = state
    return frames, prompt, answer(caption, prior_choice(getattr(state, "expert", None), len(actions), prior_q, rng))


def collate(processor, examples):
    """Tokenise (images, prompt, answer) triples; labels cover the answer and its <|im_end|> only."""
    tok = processor.tokenizer
    texts = [processor.apply_chat_template([rollout.user_message(len(im), p)], add_generation_prompt=True)
             + a + "<|im_end|>" for im, p, a in examples]
    tok.padding_side = "right"
    batch = processor(text=texts, images=[list(im) for im, _, _ in examples], padding=True, return_tensors="pt")
    # the answer starts after the last "<|im_start|>assistant\n"
    header = 1 + len(tok("assistant\n")["input_ids"])
    is_start = batch["input_ids"] == tok.convert_tokens_to_ids("<|im_start|>")
    last_start = (is_start * torch.arange(is_start.shape[1])).argmax(1)  # (B,)
    positions = torch.arange(is_start.shape[1])[None]  # (1, T)
    labels = batch["input_ids"].masked_fill(positions < (last_start + header)[:, None], -100)
    batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def tokenizer_corpus(sampler, n=3000):
    """Text the model will read and write: prompts, captions and JSON answers of every env."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        frames, prompt, caption, actions, answer = sampler.sample()
        yield prompt
        yield answer(caption, int(rng.integers(len(actions))))
    yield CAPTION_PROMPT + " user assistant system"


# ---------------------------------------------------------------------------- pre-training
def answer_loss(model, batch):
    """The next-token loss on the answer tokens (labels != -100), as model(**batch).loss, with the language model
    head applied only at the positions whose next token is an answer token."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    hidden = model.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state  # (B, T, H)
    answer = labels != -100
    logits = model.lm_head(hidden[:, :-1][answer])  # (answer tokens, vocab)
    return F.cross_entropy(logits, labels[answer])


def pretrain(model, processor, sampler, cfg: TinyConfig, steps=None, progress=True):
    """Next-token loss on the answers + the auxiliary mean-pooled probe (see the module docstring)."""
    steps = cfg.pretrain_steps if steps is None else steps
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    vocab, probe_len = len(processor.tokenizer), 24
    if cfg.aux_pool == "mean":
        probe = torch.nn.Linear(cfg.hidden_size, probe_len * vocab)  # mean image feature -> caption tokens
    else:  # every image token's feature, through a 256-wide linear bottleneck (a full matrix would be 60M weights)
        frame = sampler.sample()[0][-1]
        tokens = int(processor.image_processor(images=[frame])["image_grid_thw"].prod() // 4)
        probe = torch.nn.Sequential(torch.nn.Linear(tokens * cfg.hidden_size, 256),
                                    torch.nn.Linear(256, probe_len * vocab))
    captured = {}
    hook = model.model.visual.register_forward_hook(lambda m, i, o: captured.__setitem__("feats", o.pooler_output))
    params = list(model.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=cfg.fast_pretrain or None)
    next_token_loss = answer_loss if cfg.fast_pretrain else (lambda model, batch: model(**batch).loss)
    warmup, horizon = max(1, steps // 20), max(1, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 5% of the peak
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, horizon) / horizon))))
    model.train()
    bar = tqdm(range(steps), desc="pre-training the tiny VLM", disable=not progress)
    for _ in bar:
        batch = collate(processor, [caption_example(sampler.sample()) for _ in range(cfg.batch_size)])
        loss = next_token_loss(model, batch)
        caption_feats = captured["feats"]  # (B * image tokens, hidden), from the vision tower in that forward
        if cfg.format_batch_size:
            formats = collate(processor, [format_example(sampler.sample(), rng, cfg.prior_q)
                                          for _ in range(cfg.format_batch_size)])
            loss = loss + next_token_loss(model, formats)
        if cfg.aux_coef > 0:
            tokens_per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
            pool = (lambda f: f.mean(0)) if cfg.aux_pool == "mean" else (lambda f: f.flatten())
            image_feats = torch.stack([pool(f) for f in caption_feats.split(tokens_per_image)])  # (B, D)
            targets = torch.full((len(tokens_per_image), probe_len), -100)  # first probe_len caption tokens
            for i, labels in enumerate(batch["labels"]):
                caption = labels[labels != -100][:probe_len]
                targets[i, : len(caption)] = caption
            logits = probe(image_feats).view(-1, probe_len, vocab)
            loss = loss + cfg.aux_coef * F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    hook.remove()
    model.eval()


@torch.no_grad()
def generate_answers(model, processor, image_lists, prompts, max_new_tokens=32, temperature=0.0):
    """Answers to a batch of (frames, prompt), greedy unless a temperature is given (rollout.answer)."""
    return rollout.answer(model, processor, image_lists, prompts, rollout.Sampling(temperature, max_new_tokens)).texts


def caption_accuracy(model, processor, env_id, num_frames=200, seed=12345, batch_size=50):
    """Exact-match accuracy of the model's caption of held-out frames (states from seeds the
    pre-training never drew) against env.state_text(). Works for any checkpoint built on the tiny
    model, before or after RL: the miniature of the paper's "RL does not degrade image understanding"."""
    answers, truths = caption_answers(model, processor, env_id, num_frames, seed, batch_size)
    return sum(a.strip() == t for a, t in zip(answers, truths)) / num_frames


def caption_answers(model, processor, env_id, num_frames=200, seed=12345, batch_size=50):
    """(the model's answers to CAPTION_PROMPT, the true captions) on caption_accuracy's held-out frames, greedy."""
    states = held_out_states(env_id, num_frames, seed)
    answers = []
    for i in range(0, num_frames, batch_size):
        chunk = states[i : i + batch_size]
        answers += generate_answers(model, processor, [s[0][-1:] for s in chunk], [CAPTION_PROMPT] * len(chunk))
    return answers, [s[2] for s in states]


def held_out_states(env_id, num_states, seed=12345):
    """States drawn as the env's family draws them in pre-training, from a seed that pre-training never uses."""
    sampler = sampler_of(config_for(env_id), [env_id], seed)
    return [sampler.sample() for _ in range(num_states)]


@torch.no_grad()
def state_readout_accuracy(model, processor, env_id, num_states=400, seed=12347, batch_size=50):
    """How much of the scene the value head's input holds: the language model's last-layer state at the last
    prompt token of task prompts (what VL-DAC's value head reads), a ridge-regression read-out of the caption
    fitted on the first 3/4 of num_states held-out states, its exact-caption accuracy on the last quarter."""
    states = held_out_states(env_id, num_states, seed)
    features = []
    for i in range(0, num_states, batch_size):
        chunk = states[i : i + batch_size]
        batch = rollout.prompt_inputs(processor, [s[0] for s in chunk], [s[1] for s in chunk], model.device)
        hidden = rollout.base_model(model).model(**batch, use_cache=False).last_hidden_state[:, -1]  # (b, H)
        features.append(hidden.double().cpu())
    x = torch.cat(features)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, H + 1) with a bias column
    names = sorted({s[2] for s in states})
    y = F.one_hot(torch.tensor([names.index(s[2]) for s in states]), len(names)).double()  # (N, captions)
    fit = num_states * 3 // 4
    weights = torch.linalg.solve(x[:fit].T @ x[:fit] + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype),
                                 x[:fit].T @ y[:fit])  # (H + 1, captions)
    return ((x[fit:] @ weights).argmax(1) == y[fit:].argmax(1)).double().mean().item()


@torch.no_grad()
def parse_failure_rate(model, processor, env_id, num_prompts=200, seed=12346, batch_size=50, max_new_tokens=48):
    """Share of answers to held-out task prompts, sampled at temperature 1 as in a rollout, that name no valid
    action (envs.parse_action). Before RL this says whether the model knows the env's answer format."""
    states, failures = held_out_states(env_id, num_prompts, seed), 0
    rng = np.random.default_rng(0)
    torch.manual_seed(seed)
    for i in range(0, num_prompts, batch_size):
        chunk = states[i : i + batch_size]
        answers = generate_answers(model, processor, [s[0] for s in chunk], [s[1] for s in chunk], max_new_tokens, 1.0)
        for answer, state in zip(answers, chunk):
            failures += envs.parse_action(answer, state[3], rng)[1]
    return failures / num_prompts


@torch.no_grad()
def expert_probabilities(model, processor, env_id, num_states=200, seed=12348, states_per_batch=8):
    """How strong the prior is: the probability of the expert's action in each held-out state that has one. Each valid
    action a is scored as the whole answer {"thoughts": <true caption>, "action": a}, teacher-forced, and the scores
    are normalised over the actions: exact (no sampling noise), and perception is left out (the hint alone)."""
    states = [s for s in held_out_states(env_id, num_states, seed) if s.expert is not None]
    probabilities = []
    for i in range(0, len(states), states_per_batch):
        chunk = states[i : i + states_per_batch]
        batch = collate(processor, [(s[0], s[1], s[4](s[2], a)) for s in chunk for a in range(len(s[3]))])
        labels = batch.pop("labels")[:, 1:]  # position t predicts token t+1
        logprobs = model(**batch).logits[:, :-1].log_softmax(-1)
        answer = (logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(1)  # (rows,)
        for state, scores in zip(chunk, answer.split([len(s[3]) for s in chunk])):
            probabilities.append(scores.softmax(0)[state.expert].item())
    return np.array(probabilities)


# ---------------------------------------------------------------------------- build, ship, find
MODELS = Path(__file__).resolve().parent / "models"  # the shipped models, one directory per family
CAPTION_FRAMES, PARSE_PROMPTS = 200, 200  # the probe's sizes when a model is released (its card's figures)


def build(out_dir, cfg: TinyConfig = TinyConfig(), progress=True):
    """Build, pre-train and save (model + processor + a card with what was measured) to out_dir. Runs with the
    caller's torch threads: the card records how many (the order of a matrix product's sums depends on it, so
    another count builds another model, as does another machine's arithmetic)."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    processor = build_processor(cfg, tokenizer_corpus(sampler_of(cfg, cfg.env_ids, cfg.seed)))
    sampler = sampler_of(cfg, cfg.env_ids, cfg.seed, weights=cfg.env_weights)
    model = build_model(cfg, processor.tokenizer)
    pretrain(model, processor, sampler, cfg, progress=progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    card = dict(config=asdict(cfg), data_version=DATA_VERSION, pillow=PIL.__version__, torch=torch.__version__,
                threads=torch.get_num_threads(), rendering=rendering_key(envs_read(cfg)),
                build_seconds=round(time.time() - start, 1), parameters=sum(p.numel() for p in model.parameters()))
    (out_dir / "tiny_vlm.json").write_text(json.dumps(card, indent=2))
    return out_dir


def probe(path, env_ids, caption_frames=CAPTION_FRAMES, parse_prompts=PARSE_PROMPTS):
    """{env_id: {caption_accuracy, parse_failures}} of the model at path, on held-out states."""
    model, processor = load(path)
    return {env_id: dict(caption_accuracy=caption_accuracy(model, processor, env_id, caption_frames),
                         parse_failures=parse_failure_rate(model, processor, env_id, parse_prompts))
            for env_id in env_ids}


def card(path) -> dict:
    return json.loads((Path(path) / "tiny_vlm.json").read_text())


def cache_dir():
    return Path(os.environ.get("VLDAC_CACHE", Path.home() / ".cache" / "vldac"))


@functools.lru_cache(maxsize=None)
def rendering_key(env_ids) -> str:
    """A hash of how this machine draws the first frame of each card game in env_ids ('' for MiniWorld alone).
    The envs draw text the same way everywhere (envs.FONT), but the glyphs still come from the machine's FreeType,
    and a model this small reads the exact pixels it was trained on."""
    frames = [envs.make_env(env_id).reset(seed=0)[0] for env_id in env_ids if env_id.startswith("gym_cards/")]
    return hashlib.sha1(b"".join(np.ascontiguousarray(f).tobytes() for f in frames)).hexdigest()[:10] if frames else ""


def shipped_path(family) -> Path:
    return MODELS / f"tiny-{family}"


def cache_path(family) -> Path:
    """Where `python tiny_vlm.py --build FAMILY` puts a model for this machine's frames: keyed by the family's
    recipe, the data version and how this machine draws the frames."""
    cfg = FAMILIES[family]
    key = hashlib.sha1(json.dumps([asdict(cfg), DATA_VERSION, rendering_key(envs_read(cfg))],
                                  sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"tiny-{family}-{key}"


class FramesDiffer(Exception):
    """No tiny model of a family reads this machine's frames: the shipped one was trained on frames drawn otherwise
    (or is missing), and none was built here."""


def tiny_model_path(family="numberline") -> str:
    """The tiny model of a family: the shipped one (models/), or, on a machine that draws that family's frames
    differently from the shipped model's (rendering_key), the one `--build` made for this machine's frames."""
    cfg, shipped, rebuilt = FAMILIES[family], shipped_path(family), cache_path(family)
    is_shipped = (shipped / "tiny_vlm.json").exists()
    if is_shipped and card(shipped)["rendering"] == rendering_key(envs_read(cfg)):
        return str(shipped)
    if (rebuilt / "tiny_vlm.json").exists():
        return str(rebuilt)
    if not is_shipped:
        raise FramesDiffer(f"the shipped tiny model {shipped.relative_to(MODELS.parent)} is missing (`git checkout "
                           f"models/` restores it); or build one with `python tiny_vlm.py --build {family}`")
    raise FramesDiffer(f"this machine draws {', '.join(envs_read(cfg))} frames differently from those the shipped "
                       f"tiny model ({shipped.relative_to(MODELS.parent)}) was trained on, and it would misread "
                       f"them; build one for this machine's frames once with `python tiny_vlm.py --build {family}` "
                       f"(minutes; docs/tiny_model.md)")


def load(path):
    """Load any Qwen2-VL-style checkpoint the way vldac.py does (used by the tests and the probe)."""
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _main():
    import argparse
    import dataclasses
    import shutil

    parser = argparse.ArgumentParser(description=f"Build tiny VLMs (one per family of envs: {', '.join(FAMILIES)}) "
                                     "and print each env's probe figures on held-out states (caption accuracy, parse "
                                     "failures at temperature 1) beside the shipped model's.")
    parser.add_argument("--build", nargs="+", required=True, choices=list(FAMILIES) + ["all"], metavar="FAMILY",
                        help=f"families to build: {', '.join(FAMILIES)}, or all")
    parser.add_argument("--out", default=None, help="directory to build into, one tiny-FAMILY sub-directory each "
                        "(models/ re-ships them; default: the cache, where --model-id tiny finds a model for a "
                        "machine that draws frames differently from the shipped models)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a build never "
                        "stalls beside other work; another count builds another model)")
    parser.add_argument("--seed", type=int, default=None, help="build seed (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the recipe's)")
    parser.add_argument("--prior-q", type=float, default=None, help="the weak prior's q, the share of answers "
                        "that take the expert's action (default: the recipe's; families with a prior only)")
    parser.add_argument("--probe-frames", type=int, default=CAPTION_FRAMES, help="held-out frames and prompts per "
                        "env for the probe figures (0: no probe)")
    a = parser.parse_args()
    if a.threads < 1 or (a.steps is not None and a.steps < 0) or a.probe_frames < 0:
        parser.error("--threads must be >= 1, --steps and --probe-frames >= 0")
    without = [n for n in (FAMILIES if "all" in a.build else a.build) if not isinstance(FAMILIES[n], PriorConfig)]
    if a.prior_q is not None and (not 0 <= a.prior_q <= 1 or without):
        parser.error(f"--prior-q must be in [0, 1], for families with a prior only (not {', '.join(without)})")
    torch.set_num_threads(a.threads)
    for name in FAMILIES if "all" in a.build else dict.fromkeys(a.build):
        changes = {k: v for k, v in dict(seed=a.seed, pretrain_steps=a.steps, prior_q=a.prior_q).items()
                   if v is not None}
        cfg = dataclasses.replace(FAMILIES[name], **changes)
        out = Path(a.out) / f"tiny-{name}" if a.out else cache_path(name)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        print(f"building the tiny {name} model ({cfg.pretrain_steps} pre-training steps, {a.threads} thread(s)) "
              f"into {out}", flush=True)
        build(tmp, cfg)
        if a.probe_frames:
            figures = probe(tmp, envs_read(cfg), a.probe_frames, a.probe_frames)
            (tmp / "tiny_vlm.json").write_text(json.dumps({**card(tmp), "probe": figures}, indent=2))
        shipped = card(shipped_path(name)) if (shipped_path(name) / "tiny_vlm.json").exists() else {}
        shutil.rmtree(out, ignore_errors=True)  # a rebuild replaces the model whole, never half
        os.replace(tmp, out)
        built = card(out)
        print(f"{name}: {built['parameters']:,} parameters, built in {built['build_seconds']} s", flush=True)
        for env_id, row in built.get("probe", {}).items():
            was = shipped.get("probe", {}).get(env_id)
            beside = (f" (shipped: {was['caption_accuracy']:.3f}, {was['parse_failures']:.3f})" if was else "")
            print(f"  {env_id}: caption accuracy {row['caption_accuracy']:.3f}, parse failures "
                  f"{row['parse_failures']:.3f}{beside}", flush=True)


if __name__ == "__main__":
    _main()
