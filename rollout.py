# Rollouts for VL-DAC (arXiv 2508.04280): num_envs TextEnvs advance in lockstep, one batched generate
# and one batched scoring forward per env step. No training logic here; vldac.py owns the update.
"""What one env step stores, so that the update never runs the processor again:

    input_ids, mm_token_type_ids (P_i,)   the prompt exactly as generate() saw it, padding stripped
    image_features                        what the frozen vision tower made of its K frames, computed once
                                          (encode_images); where a family cannot take them back, its pixels:
    pixel_values (patches_i, D), image_grid_thw (K, 3)   Qwen's packed patches; else pixel_values (K', 3, H, W)
    response_ids, logprobs, ref_logprobs (R_i,)   generated tokens through the first end-of-turn token
    value, reward, terminated, truncated, bootstrap_value   (scalars, in (T, N) tensors)

`collate` pads a list of stored steps back into one batch: prompts left-padded (so the last prompt
token is the last prompt column of every row), responses right-padded with a token mask.
"""
import contextlib
import dataclasses
import inspect
import json
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from flags import fail

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # (B, P) processor outputs
TEXT_MARKS = ("mm_token_type_ids", "token_type_ids")  # text (0) / image (1) per token: Qwen2-VL's, Gemma 3's


def user_message(num_images, text):
    """One user turn: the frames as separate images, then the text (the paper's prompt layout)."""
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def prompt_inputs(processor, frames, prompts, device):
    """Processor outputs for a batch of (frames (K, H, W, 3), prompt) states, left-padded."""
    texts = [processor.apply_chat_template([user_message(len(f), p)], add_generation_prompt=True)
             for f, p in zip(frames, prompts)]
    processor.tokenizer.padding_side = "left"  # the last prompt token is column P - 1 in every row
    inputs = processor(text=texts, images=[list(f) for f in frames], padding=True, return_tensors="pt")
    return inputs.to(device)


def base_model(model):
    """The transformers model inside a peft wrapper (its LoRA layers stay active), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def compute_context(model):
    """Where the model holds bf16 weights (vlm.load_policy on CUDA), forwards run under bf16 autocast: matrix
    products in bf16, the fp32 trainable weights cast on the fly, norms and softmax in fp32. fp32 runs as it is."""
    if not any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)


def encode_images(model, inputs):
    """Run the frozen vision tower once: prompt inputs -> the same inputs with `mm_encoder_outputs` (transformers'
    pre-encoded images, which generate() and forward() take in place of pixels) instead of the pixel tensors. The
    tower never trains (vlm.prepare_policy), so its output for a frame is the same in generate, the scoring and
    reference forwards and every PPO epoch: computing it once removes most of a small model's forward on MiniWorld's
    4 frames. Families whose image output carries more than per-image features (Qwen3-VL's deepstack layers) keep
    their pixels (found on the first call, then remembered on the model)."""
    base = base_model(model)
    encoder = getattr(base, "get_image_features", None)
    pixel_keys = [k for k in inputs.keys() if k.startswith("pixel_values")]
    if (encoder is None or not pixel_keys or getattr(base, "keeps_pixels", False)
            or "mm_encoder_outputs" not in inspect.signature(base.forward).parameters):
        return inputs
    kwargs = {k: inputs[k] for k in inspect.signature(encoder).parameters if k in inputs}
    with torch.no_grad(), compute_context(model):
        features = encoder(**kwargs, return_dict=True)
    extra = [k for k, v in features.items() if v is not None and k not in ("last_hidden_state", "pooler_output",
                                                                            "hidden_states", "attentions")]
    if extra or not isinstance(features.pooler_output, (torch.Tensor, tuple, list)):
        base.keeps_pixels = True  # only a forward tells: remembered, the tower runs here once per model
        return inputs
    return with_image_features({k: v for k, v in inputs.items() if k not in pixel_keys}, features.pooler_output)


def image_features(inputs):
    """The pre-encoded images of inputs (a tensor with a row per image or tile, or a tuple of per-image tensors),
    or None where the inputs carry pixels."""
    encoded = inputs.get("mm_encoder_outputs")
    return None if encoded is None else encoded["image"].pooler_output


def with_image_features(inputs, features):
    return dict(inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)})


def eos_token_ids(model):
    """End-of-turn ids: the generation config's eos (a real checkpoint may list several) and the text config's."""
    eos = base_model(model).generation_config.eos_token_id
    return sorted({*(eos if isinstance(eos, list) else [eos]), model.config.get_text_config().eos_token_id} - {None})


VISION_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",  # Qwen
                 "boi_token_index", "eoi_token_index")  # Gemma 3 (its image_token_id is the soft token)


def vision_token_ids(model):
    """Vision special tokens, those of the config's family: never sampled (generated, one would break the next
    forward pass)."""
    config = base_model(model).config
    return sorted({getattr(config, name) for name in VISION_TOKENS if getattr(config, name, None) is not None})


@contextlib.contextmanager
def lora_merged(model):
    """Decode with the LoRA adapter folded into the weights: W + (alpha / r) B A in place, the adapter disabled, so
    each adapted layer costs one matrix product instead of three (2B layout on an H100, batch 64: 9.6 -> 7.1-8.3 ms
    per decoding step). Afterwards the weights are restored bit for bit from a copy: peft's unmerge_adapter subtracts
    the update again, which rounds bf16 weights on every round trip, a random walk that would move the frozen
    reference (the adapter disabled) as well. The copy costs GPU memory: 2.6 GB at 2B, 13 GB at 7B."""
    layers = [layer for layer in model.modules() if isinstance(layer, LoraLayer)]
    weights = [layer.get_base_layer().weight for layer in layers]
    saved = [weight.detach().clone() for weight in weights]
    try:
        with torch.no_grad():
            for layer, weight in zip(layers, weights):
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters)  # fp32 (out, in)
                weight.copy_(weight.float() + delta)  # one rounding to the weight's dtype
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for weight, copy in zip(weights, saved):
                weight.copy_(copy)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How responses are decoded, the one route to generate(). temperature 0: greedy; T > 0: the full distribution
    at T (log-probs are scored at the same T). static_cache: transformers' fixed-size KV cache, with which it
    compiles the decoding step on CUDA. merge_lora: decode with the adapter merged (lora_merged)."""

    temperature: float = 1.0
    max_new_tokens: int = 48
    static_cache: bool = False
    merge_lora: bool = False


def sampling_for(policy, device, temperature, max_new_tokens, static_cache=None, merge_lora=False, bf16=None):
    """vldac.py's decoding settings. static_cache None: on CUDA with LoRA (a full fine-tune under bf16 autocast has
    fp32 embeddings, and its eager prefill and compiled decoding steps disagree on the cache's dtype)."""
    lora, compiled = isinstance(policy, PeftModel), torch.device(device).type == "cuda"  # transformers compiles on CUDA
    if static_cache is None:
        static_cache = compiled and lora
    if static_cache and compiled and bf16 is not False and not lora:
        fail("--static-cache True on CUDA needs LoRA (--lora-r > 0) or --bf16 False: in a full fine-tune under bf16 "
             "autocast the compiled decoding step writes bf16 keys into the prefill's fp32 cache")
    return Sampling(temperature, max_new_tokens, static_cache, merge_lora and lora)


def generate(model, inputs, pad_token_id, sampling):
    """The one call to model.generate() -> response ids (B, R). Sampling is explicit (top_k=0, top_p=1, no
    repetition penalty), since a checkpoint's generation_config (Qwen2-VL: top_k=1) would otherwise fill them in.
    Vision tokens are suppressed and any end-of-turn id stops a row. The static cache and the merged adapter change
    how tokens are sampled, not what is scored: log-probs come from the scoring forward either way."""
    decoding = dict(do_sample=False) if sampling.temperature == 0 else dict(
        do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0)
    if sampling.static_cache:
        decoding["cache_implementation"] = "static"
    merged = lora_merged(model) if sampling.merge_lora and isinstance(model, PeftModel) else contextlib.nullcontext()
    with merged, compute_context(model):
        sequences = model.generate(**inputs, **decoding, repetition_penalty=1.0, max_new_tokens=sampling.max_new_tokens,
                                   suppress_tokens=vision_token_ids(model), eos_token_id=eos_token_ids(model),
                                   pad_token_id=pad_token_id)  # (B, P + R)
    return sequences[:, inputs["input_ids"].shape[1]:]


def response_mask(response_ids, eos_ids):
    """1 for generated tokens up to and including the first end-of-turn token, 0 for padding after it."""
    is_eos = torch.isin(response_ids, eos_ids).long()  # (B, R)
    return (is_eos.cumsum(1) - is_eos) == 0  # no eos strictly before this position


@dataclasses.dataclass
class Answers:
    """A batch of responses: the prompt inputs generate() saw, the response ids (B, R), the token mask (B, R) through
    the first end-of-turn token, and the decoded texts."""

    inputs: dict
    response_ids: torch.Tensor
    token_mask: torch.Tensor
    texts: list


def answer(model, processor, frames, prompts, sampling):
    """Observations -> answers, the one path from what an env shows to what the model says (rollouts, evaluation,
    the tiny model's probes): the prompt as the processor builds it, one batched generate, decoded up to each row's
    end of turn. frames: per row a list of (H, W, 3) images; prompts: per row the text."""
    inputs = encode_images(model, prompt_inputs(processor, frames, prompts, model.device))
    pad_token_id = processor.tokenizer.pad_token_id
    response_ids = generate(model, inputs, pad_token_id, sampling)  # (B, R)
    token_mask = response_mask(response_ids, torch.tensor(eos_token_ids(model), device=model.device))  # (B, R)
    texts = processor.batch_decode(response_ids.masked_fill(~token_mask, pad_token_id), skip_special_tokens=True)
    return Answers(inputs, response_ids, token_mask, texts)


def split_steps(inputs, response_ids, token_mask):
    """A batch of processor outputs + responses -> one dict per row, padding stripped, on the CPU. Image inputs:
    Qwen's packed patches split by each image's (t, h, w) grid; any other per-image or per-row tensor (Gemma 3's
    frames, InternVL's tiles, LLaVA-OneVision's crops and image sizes) split evenly, since every row shows the same
    number of frames of one size."""
    num_rows = inputs["input_ids"].shape[0]
    images = [{} for _ in range(num_rows)]
    features = image_features(inputs)
    if features is not None:  # per image (Qwen, LLaVA) or per image / tile (Gemma 3, InternVL, SmolVLM)
        per_row = len(features) // num_rows  # every env shows K frames of one size
        parts = [features[i * per_row: (i + 1) * per_row] for i in range(num_rows)]
        images = [dict(image_features=p.cpu() if torch.is_tensor(p) else tuple(f.cpu() for f in p)) for p in parts]
    elif "image_grid_thw" in inputs:  # (all patches, D) with a (t, h, w) grid per image
        images_per_row = inputs["image_grid_thw"].shape[0] // num_rows  # every env shows K frames
        grids = inputs["image_grid_thw"].cpu().split(images_per_row)  # N x (K, 3)
        pixels = inputs["pixel_values"].cpu().split([int(g.prod(-1).sum()) for g in grids])  # N x (patches, D)
        images = [dict(pixel_values=p, image_grid_thw=g) for p, g in zip(pixels, grids)]
    for key in inputs.keys() - SEQUENCE_KEYS - images[0].keys() - {"mm_encoder_outputs"}:  # N * K' -> N x K'
        for image, part in zip(images, inputs[key].cpu().split(len(inputs[key]) // num_rows)):
            image[key] = part
    prompt_lengths = inputs["attention_mask"].sum(1).tolist()
    response_lengths = token_mask.sum(1).tolist()
    steps = []
    for i in range(num_rows):
        step = {k: inputs[k][i, -prompt_lengths[i]:].cpu() for k in SEQUENCE_KEYS if k in inputs}
        step.update(images[i], response_ids=response_ids[i, : response_lengths[i]].cpu())
        steps.append(step)
    return steps


def collate(steps, pad_token_id, device):
    """Stored steps -> (prompt inputs, response_ids (B, R), token_mask (B, R)), ready for a forward."""
    prompt_len = max(len(s["input_ids"]) for s in steps)
    response_len = max(len(s["response_ids"]) for s in steps)
    inputs = {}
    for key in SEQUENCE_KEYS:
        if key in steps[0]:
            pad = pad_token_id if key == "input_ids" else 0
            inputs[key] = torch.stack([torch.cat([s[key].new_full((prompt_len - len(s[key]),), pad), s[key]])
                                       for s in steps]).to(device)  # (B, P), left-padded
    for key in steps[0].keys() - SEQUENCE_KEYS - {"response_ids", "image_features"}:  # images: Qwen (patches, D),
        inputs[key] = torch.cat([s[key] for s in steps]).to(device)  # (B * K, 3); others (B * K', ...)
    if "image_features" in steps[0]:  # a tensor (B * K', ...) or a tuple of B * K tensors
        if torch.is_tensor(steps[0]["image_features"]):
            features = torch.cat([s["image_features"] for s in steps]).to(device)
        else:
            features = tuple(f.to(device) for s in steps for f in s["image_features"])
        inputs = with_image_features(inputs, features)
    response_ids = torch.full((len(steps), response_len), pad_token_id, dtype=torch.long)
    token_mask = torch.zeros((len(steps), response_len), dtype=torch.bool)
    for i, s in enumerate(steps):
        response_ids[i, : len(s["response_ids"])] = s["response_ids"]
        token_mask[i, : len(s["response_ids"])] = True
    return inputs, response_ids.to(device), token_mask.to(device)


def pad_stack(rows, length):
    """1-D tensors of different lengths -> (B, length), zero-padded on the right."""
    return torch.stack([torch.nn.functional.pad(r, (0, length - len(r))) for r in rows])


@dataclasses.dataclass
class Rollout:
    """Everything the update needs from num_steps (T) env steps of num_envs (N) envs."""

    steps: list  # T * N dicts (see the module docstring), index t * N + env
    logprobs: list  # T * N tensors (R_i,): log pi_old at the sampling temperature
    ref_logprobs: list  # T * N tensors (R_i,): log pi_ref (adapter disabled, or the frozen copy)
    values: torch.Tensor  # (T, N) V_old(s_t)
    rewards: torch.Tensor  # (T, N)
    terminated: torch.Tensor  # (T, N) bool
    truncated: torch.Tensor  # (T, N) bool
    bootstrap_values: torch.Tensor  # (T, N) V(s_{t+1}) of the truncated state where truncated, else 0
    last_values: torch.Tensor  # (N,) V(s_T) of the states the next rollout starts from
    episodes: list  # dict(episodic_return, episodic_length, success) per episode that ended in this rollout
    parse_failures: int
    response_tokens: float  # mean generated tokens per env step, end-of-turn included
    episode_of_step: torch.Tensor = None  # collect_episodes only: (S,) the env (= episode) of each step


@dataclasses.dataclass
class Episode:
    """An episode in play: its number (its name in trajectories), the frames the model answers next, the totals."""

    number: int
    frames: list
    ret: float = 0.0
    length: int = 0

    def step(self, env, text, trajectories=None):
        """env acts on the answer text; the step goes to trajectories if given. Returns (reward, terminated,
        truncated, info, summary), summary = the finished episode's record (None while it goes on)."""
        seen, prompt = self.frames[-1], env.prompt()  # (H, W, 3) the newest frame the model answered
        self.frames, reward, terminated, truncated, info = env.step(text)
        if trajectories is not None:
            trajectories.write(dict(episode=self.number, step=self.length, prompt=prompt, answer=text,
                                    action=info["action"], action_name=env.actions[info["action"]],
                                    parse_failed=bool(info["parse_failed"]), reward=float(reward),
                                    terminated=bool(terminated), truncated=bool(truncated)), seen, env.num_frames)
        self.ret += reward
        self.length += 1
        summary = dict(episode=self.number, episodic_return=float(self.ret), episodic_length=self.length,
                       success=bool(info["success"])) if terminated or truncated else None
        return reward, terminated, truncated, info, summary


class Trajectories:
    """What the agent saw and said, one JSON line per step in DIR/{env}.jsonl (env_id, episode, step, prompt,
    answer, action, action_name, parse_failed, reward, terminated, truncated, frames) and the frame it answered
    as DIR/frames/{env}__episode{k}__step{t}.png. `frames` lists the prompt's images, oldest first, as paths
    relative to DIR (the first frame of an episode repeated until K frames exist, as envs.TextEnv stacks them)."""

    def __init__(self, directory, env_id):
        self.dir, self.env_id, self.tag = Path(directory), env_id, env_id.replace("/", "_")
        (self.dir / "frames").mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / f"{self.tag}.jsonl", "w", buffering=1)  # line-buffered: complete lines on disk
        self.seen = {}  # episode -> frame paths so far

    def write(self, record, frame, num_frames):
        """record: Episode.step's fields of one step; frame (H, W, 3): the newest the model saw, of num_frames."""
        path = f"frames/{self.tag}__episode{record['episode']}__step{record['step']}.png"
        Image.fromarray(frame).save(self.dir / path)
        seen = self.seen.setdefault(record["episode"], [])
        seen.append(path)
        frames = ([seen[0]] * num_frames + seen)[-num_frames:]
        self.file.write(json.dumps(dict(env_id=self.env_id, **record, frames=frames)) + "\n")
        if record["terminated"] or record["truncated"]:
            del self.seen[record["episode"]]

    def close(self):
        self.file.close()


class EnvRunner:
    """num_envs TextEnvs stepped together. It owns the reset loop: a finished env is reset at once
    with a derived seed, its episode recorded; no reset step ever becomes experience."""

    def __init__(self, env_list, seed):
        self.envs, self.seed = env_list, seed
        self.episodes_started = [0] * len(env_list)
        self.episodes = [Episode(i, env.reset(seed=seed + i)[0]) for i, env in enumerate(env_list)]  # env i: seed + i

    def reset(self, i, seed=None):
        """Env i starts its next episode, k: number k * num_envs + i, seed + that number unless given (LOOP's)."""
        self.episodes_started[i] += 1
        number = self.episodes_started[i] * len(self.envs) + i  # never repeated
        self.episodes[i] = Episode(number, self.envs[i].reset(seed=self.seed + number if seed is None else seed)[0])

    @torch.no_grad()
    def collect(self, agent, processor, num_steps, trajectories=None):
        """Advance every env num_steps times under the current policy (eval mode: no dropout). trajectories: a
        Trajectories that every step is written to (what the agent saw and said), or None."""
        agent.eval()
        num_envs = len(self.envs)
        shape = (num_steps, num_envs)  # (T, N)
        rollout = Rollout(steps=[], logprobs=[], ref_logprobs=[], values=torch.zeros(shape), rewards=torch.zeros(shape),
                          terminated=torch.zeros(shape, dtype=torch.bool),
                          truncated=torch.zeros(shape, dtype=torch.bool), bootstrap_values=torch.zeros(shape),
                          last_values=None, episodes=[], parse_failures=0, response_tokens=0.0)
        for t in range(num_steps):
            steps, logprobs, ref_logprobs, values, texts = self.respond(agent, processor, range(num_envs))
            rollout.steps += steps
            rollout.logprobs += logprobs
            rollout.ref_logprobs += ref_logprobs
            rollout.values[t] = values
            rollout.response_tokens += sum(map(len, logprobs)) / (num_steps * num_envs)

            truncated_states = []
            for i, (env, text) in enumerate(zip(self.envs, texts)):
                reward, terminated, truncated, info, summary = self.episodes[i].step(env, text, trajectories)
                rollout.rewards[t, i], rollout.terminated[t, i], rollout.truncated[t, i] = reward, terminated, truncated
                rollout.parse_failures += int(info["parse_failed"])
                if summary is not None:
                    rollout.episodes.append(summary)
                if truncated and not terminated:  # a time limit: bootstrap from V(truncated state)
                    truncated_states.append((i, self.episodes[i].frames, env.prompt()))
            if truncated_states:  # one value-only forward for all truncated envs, before their reset
                index, frames, prompts = zip(*truncated_states)
                values = agent.get_value(prompt_inputs(processor, frames, prompts, agent.device))  # (n,)
                rollout.bootstrap_values[t, list(index)] = values.float().cpu()
            for i in range(num_envs):
                if rollout.terminated[t, i] or rollout.truncated[t, i]:
                    self.reset(i)
        inputs = prompt_inputs(processor, [e.frames for e in self.episodes], [env.prompt() for env in self.envs],
                               agent.device)
        rollout.last_values = agent.get_value(inputs).float().cpu()  # (N,)
        return rollout

    def respond(self, agent, processor, indices):
        """The model's part of one env step of envs `indices`, batched: one generate and one scoring forward (and
        the reference's). Returns the stored steps, log pi_old and log pi_ref per step ((R_i,) each), V_old (n,)
        and the decoded answers."""
        out = answer(agent.policy, processor, [self.episodes[i].frames for i in indices],
                     [self.envs[i].prompt() for i in indices], agent.sampling)
        # the scoring forward gets exactly what generate got, response appended
        logprobs, values = agent.get_logprobs_and_value(out.inputs, out.response_ids, out.token_mask)  # (n, R), (n,)
        ref_logprobs = agent.get_reference_logprobs(out.inputs, out.response_ids, out.token_mask)  # (n, R)
        lengths = out.token_mask.sum(1).tolist()
        return (split_steps(out.inputs, out.response_ids, out.token_mask),
                [logprobs[i, :n].cpu() for i, n in enumerate(lengths)],
                [ref_logprobs[i, :n].cpu() for i, n in enumerate(lengths)], values.float().cpu(), out.texts)

    @torch.no_grad()
    def collect_episodes(self, agent, processor, group_size, trajectories=None):
        """One whole episode per env, for LOOP (a critic-free baseline): envs [g K, (g + 1) K) form group g and
        start from the same seed (the same task); envs that finish wait for the rest (trajectories: as collect).
        Returns a Rollout whose (S,) tensors run over the S env steps taken, in order of time then env, and
        `episode_of_step` (S,): the env (= episode) index of each step. Every rollout starts new episodes."""
        agent.eval()
        num_envs, groups = len(self.envs), len(self.envs) // group_size
        for i in range(num_envs):  # group g's seed: seed + g + (rollouts so far) * groups, never repeated
            self.reset(i, seed=self.seed + i // group_size + (self.episodes_started[i] + 1) * groups)
        steps, logprobs, ref_logprobs, values, rewards, episode_of_step = [], [], [], [], [], []
        episodes, parse_failures, tokens = [None] * num_envs, 0, 0
        active = list(range(num_envs))
        while active:
            step_list, step_logprobs, step_ref, step_values, texts = self.respond(agent, processor, active)
            steps += step_list
            logprobs += step_logprobs
            ref_logprobs += step_ref
            values += step_values.tolist()
            tokens += sum(map(len, step_logprobs))
            for i, text in zip(active, texts):
                reward, _, _, info, episodes[i] = self.episodes[i].step(self.envs[i], text, trajectories)
                rewards.append(reward)
                episode_of_step.append(i)
                parse_failures += int(info["parse_failed"])
            active = [i for i in active if episodes[i] is None]
        size = len(steps)
        return Rollout(steps=steps, logprobs=logprobs, ref_logprobs=ref_logprobs, values=torch.tensor(values),
                       rewards=torch.tensor(rewards, dtype=torch.float), terminated=torch.zeros(size, dtype=torch.bool),
                       truncated=torch.zeros(size, dtype=torch.bool), bootstrap_values=torch.zeros(size),
                       last_values=None, episodes=episodes, parse_failures=parse_failures,
                       response_tokens=tokens / max(size, 1), episode_of_step=torch.tensor(episode_of_step))
