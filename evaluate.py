# Evaluation for VL-DAC (arXiv 2508.04280): success rate over 50 episodes per env, as the paper reports.
"""Run a policy for a fixed number of episodes and report. Run:
    python evaluate.py --model-ids tiny runs/RUN/model --env-ids gym_cards/NumberLine-v0   # base vs trained
    python evaluate.py --model-ids Qwen/Qwen2-VL-7B-Instruct --env-ids MiniWorld-OneRoom-v0 --cuda
From training (vldac.py --save-model): `evaluate.evaluate(agent.policy, processor, env_id, num_episodes=50)`.

Episode k (0-based) of an env is reset with seed + k, whichever of the num_envs slots plays it, so the
same seed gives the same episodes; with greedy decoding (temperature 0) the same results.
A recorded GIF has episode length + 1 frames: one per step (the newest frame the model saw, its answer,
the reward it got) and a last one showing the final state with the return.
"""
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw, ImageFont

import envs
import rollout
import tiny_vlm
from vlm import fail, is_tiny, load_policy, model_dir, resolve

# --max-new-tokens when not given: vldac.py's defaults tables (TINY_DEFAULTS / PAPER_DEFAULTS; a test pins them)
DEFAULT_MAX_NEW_TOKENS = dict(tiny=48, paper=256)


@dataclass
class Args:
    model_ids: list[str] = field(default_factory=lambda: ["tiny"])
    """one or more of: `tiny`, a hub id, a local directory, a vldac.py run directory or the model it saved (one
    table row per model and env)"""
    env_ids: list[str] = field(default_factory=lambda: ["gym_cards/NumberLine-v0"])
    """one or more env ids (envs.ENV_IDS)"""
    seed: int = 1
    """episode k of every env is reset with seed + k"""
    cuda: bool = True
    """if toggled, cuda will be used when available (bf16 weights and autocast, as vldac.py)"""
    num_episodes: int = 50
    """episodes per (model, env) (the paper: 50)"""
    num_envs: int = 10
    """envs stepped together, one batched generate per step"""
    temperature: float = 0.0
    """0 = greedy decoding; > 0 samples the full distribution at this temperature (no top-k/top-p)"""
    max_new_tokens: Optional[int] = None
    """response length limit (None: 48 for tiny-based models, 256 otherwise, as vldac.py)"""
    capture_video: bool = False
    """if toggled, write a GIF per recorded episode (frame, answer, reward) next to --output"""
    video_episodes: int = 2
    """episodes recorded per (model, env) with --capture-video (the first ones)"""
    caption_probe: Optional[bool] = None
    """caption accuracy on held-out frames (tiny_vlm.caption_accuracy; None: on for tiny-based models)"""
    caption_frames: int = 200
    """frames per caption probe"""
    save_trajectories: Optional[str] = None
    """a directory: every step as one JSON line (prompt, answer, parsed action, reward, ...) plus the frames as PNG,
    per model in a sub-directory (evaluate.Trajectories documents the format)"""
    output: Optional[str] = None
    """JSON file with one record per (model, env) (default: runs/eval_{time}.json)"""


def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval of a binomial proportion: sane at 0/n and n/n, unlike p +- z se."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def annotate(frame, caption, width=240, lines=4):
    """The newest frame, upscaled to >= width px wide (nearest: MiniWorld's 80 px stay crisp), text below."""
    image = Image.fromarray(frame)
    scale = max(1, math.ceil(width / image.width))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    chars = max(20, image.width // 7)  # the default bitmap font is about 6 px per character
    text = [caption[i : i + chars] for i in range(0, len(caption), chars)][:lines] or [""]
    canvas = Image.new("RGB", (image.width, image.height + 12 * lines + 6), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(text):
        draw.text((4, image.height + 3 + 12 * i), line, fill="black", font=font)
    return canvas


def save_gif(path, images):
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=800, loop=0)


@torch.no_grad()
def evaluate(model, processor, env_id, num_episodes=50, num_envs=10, temperature=0.0, max_new_tokens=256, seed=1,
             video_dir=None, video_episodes=0, env_kwargs=None, writer=None, trajectory_dir=None):
    """Play exactly num_episodes episodes of env_id (episode k reset with seed + k), num_envs at a time.
    Returns the metrics (see the module docstring); the model is left in eval mode. With a TensorBoard
    writer, each episode's return is logged as eval/episodic_return at step k (CleanRL's pattern). With a
    trajectory_dir, every step is written there (Trajectories)."""
    model.eval()
    num_envs = min(num_envs, num_episodes)
    env_list = [envs.make_env(env_id, **(env_kwargs or {})) for _ in range(num_envs)]
    device, pad_token_id = model.device, processor.tokenizer.pad_token_id
    eos_ids = torch.tensor(rollout.eos_token_ids(model), device=device)
    episodes, videos = [], []
    steps = parse_failures = response_tokens = 0
    slots = [None] * num_envs  # per env: dict(index, frames, return, length, video) of its current episode
    next_episode = 0

    def start(i):
        nonlocal next_episode
        if next_episode >= num_episodes:
            slots[i] = None  # no more episodes to hand out: the slot idles
            return
        frames, _ = env_list[i].reset(seed=seed + next_episode)
        record = video_dir is not None and next_episode < video_episodes
        slots[i] = dict(index=next_episode, frames=frames, ret=0.0, length=0, video=[] if record else None)
        next_episode += 1

    trajectories = Trajectories(trajectory_dir, env_id) if trajectory_dir is not None else None
    for i in range(num_envs):
        start(i)
    while any(slots):
        active = [i for i in range(num_envs) if slots[i] is not None]
        prompts = [env_list[i].prompt() for i in active]
        inputs = rollout.prompt_inputs(processor, [slots[i]["frames"] for i in active], prompts, device)
        response_ids = rollout.generate(model, inputs, pad_token_id, max_new_tokens, temperature)  # (B, R)
        token_mask = rollout.response_mask(response_ids, eos_ids)  # (B, R)
        answers = processor.batch_decode(response_ids.masked_fill(~token_mask, pad_token_id), skip_special_tokens=True)
        response_tokens += int(token_mask.sum())
        for i, answer, prompt in zip(active, answers, prompts):
            slot = slots[i]
            seen = slot["frames"][-1]  # (H, W, 3) the newest frame the model answered
            slot["frames"], reward, terminated, truncated, info = env_list[i].step(answer)
            if trajectories is not None:
                trajectories.write(slot["index"], slot["length"], seen, env_list[i].num_frames, prompt, answer,
                                   env_list[i].actions, info, reward, terminated, truncated)
            slot["ret"] += reward
            slot["length"] += 1
            steps += 1
            parse_failures += int(info["parse_failed"])
            if slot["video"] is not None:
                slot["video"].append(annotate(seen, f"step {slot['length']}: {answer.strip()} -> reward {reward:+g}"))
            if terminated or truncated:
                episodes.append(dict(episode=slot["index"], episodic_return=float(slot["ret"]),
                                     episodic_length=slot["length"], success=bool(info["success"])))
                if slot["video"] is not None:
                    slot["video"].append(annotate(slot["frames"][-1], f"end: return {slot['ret']:+g}, "
                                                                      f"{'success' if info['success'] else 'failure'}"))
                    path = Path(video_dir) / f"{env_id.replace('/', '_')}__episode{slot['index']}.gif"
                    save_gif(path, slot["video"])
                    videos.append(str(path))
                start(i)
    for env in env_list:
        env.close()
    if trajectories is not None:
        trajectories.close()

    episodes.sort(key=lambda e: e["episode"])
    for episode in episodes if writer is not None else []:
        writer.add_scalar("eval/episodic_return", episode["episodic_return"], episode["episode"])
    returns = np.array([e["episodic_return"] for e in episodes])
    successes = sum(e["success"] for e in episodes)
    low, high = wilson_interval(successes, num_episodes)
    return dict(env_id=env_id, num_episodes=num_episodes, success_rate=successes / num_episodes,
                success_ci95=[low, high], return_mean=float(returns.mean()), return_std=float(returns.std()),
                length_mean=float(np.mean([e["episodic_length"] for e in episodes])),
                parse_failure_rate=parse_failures / steps, response_tokens_mean=response_tokens / steps,
                episodes=episodes, videos=sorted(videos))


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

    def write(self, episode, step, frame, num_frames, prompt, answer, actions, info, reward, terminated, truncated):
        path = f"frames/{self.tag}__episode{episode}__step{step}.png"
        Image.fromarray(frame).save(self.dir / path)
        seen = self.seen.setdefault(episode, [])
        seen.append(path)
        frames = ([seen[0]] * num_frames + seen)[-num_frames:]
        self.file.write(json.dumps(dict(env_id=self.env_id, episode=episode, step=step, prompt=prompt, answer=answer,
                                        action=info["action"], action_name=actions[info["action"]],
                                        parse_failed=bool(info["parse_failed"]), reward=float(reward),
                                        terminated=bool(terminated), truncated=bool(truncated), frames=frames)) + "\n")
        if terminated or truncated:
            del self.seen[episode]

    def close(self):
        self.file.close()


def after_training(model, processor, args, run_dir, writer):
    """vldac.py's last step: args.eval_episodes greedy episodes of the trained policy (episode returns logged to
    TensorBoard, the first 2 recorded as GIFs in the run directory); prints where everything is."""
    result = evaluate(model, processor, args.env_id, num_episodes=args.eval_episodes,
                      max_new_tokens=args.max_new_tokens, seed=args.seed + 10_000, video_dir=run_dir / "videos",
                      video_episodes=2, env_kwargs=observation_kwargs(vars(args)), writer=writer)
    low, high = result["success_ci95"]
    print(f"eval: success {result['success_rate']:.2f} [{low:.2f}, {high:.2f}] over {args.eval_episodes} greedy "
          f"episodes; GIFs: {' '.join(result['videos'])}\nrun directory: {run_dir}; TensorBoard: tensorboard "
          f"--logdir {run_dir.parent}", flush=True)
    return result


def observation_kwargs(train_args):
    """envs.make_env's observation settings of a training run, from its args as a dict (frames in the prompt,
    text obs, frame size)."""
    return dict(num_frames=train_args["num_frames"], text_obs=train_args["text_obs"],
                frame_size=tuple(train_args["frame_size"]))


def checkpoint_env_kwargs(model_id):
    """Observation settings a vldac checkpoint was trained with ({} for a model vldac.py did not save)."""
    saved_args = Path(model_dir(model_id)) / "args.json"
    return observation_kwargs(json.loads(saved_args.read_text())) if saved_args.exists() else {}


def markdown_table(records):
    header = "| model | env | success (95% CI) | return | length | parse fail | tokens | caption acc |"
    rows = [header, "|" + "---|" * 8]
    for r in records:
        caption = "-" if r["caption_accuracy"] is None else f"{r['caption_accuracy']:.3f}"
        rows.append(f"| {r['model_id']} | {r['env_id']} | {r['success_rate']:.2f} "
                    f"[{r['success_ci95'][0]:.2f}, {r['success_ci95'][1]:.2f}] | "
                    f"{r['return_mean']:.2f} +- {r['return_std']:.2f} | {r['length_mean']:.1f} | "
                    f"{r['parse_failure_rate']:.2f} | {r['response_tokens_mean']:.1f} | {caption} |")
    return "\n".join(rows)


if __name__ == "__main__":
    args = tyro.cli(Args)
    for env_id in args.env_ids:
        if env_id not in envs.ENV_IDS:
            fail(f"unknown --env-ids {env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
        if env_id in envs.MINIWORLD_IDS:  # fail before loading any model if there is no GL context
            try:
                envs.make_env(env_id).close()
            except RuntimeError as e:
                fail(str(e))
    for name in ("num_episodes", "num_envs", "caption_frames"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        fail(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    output = Path(args.output or f"runs/eval_{int(time.time())}.json")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)  # sampled decoding: the same seed, the same samples

    records, settings = [], {}
    for model_id in args.model_ids:
        tiny = is_tiny(model_id)
        max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["tiny" if tiny else "paper"]
        settings[model_id] = dict(max_new_tokens=max_new_tokens)
        probe = tiny if args.caption_probe is None else args.caption_probe
        loaded = None
        for env_id in args.env_ids:
            path = resolve(model_id, env_id)  # `tiny` is one model per family of envs
            if path != loaded:
                model, processor = load_policy(model_id, device, env_id=env_id, trainable=False)
                loaded = path
            tag = model_id.strip("/").replace("/", "_")
            record = evaluate(model, processor, env_id, args.num_episodes, args.num_envs, args.temperature,
                              max_new_tokens, args.seed, env_kwargs=checkpoint_env_kwargs(model_id),
                              video_dir=output.with_suffix("") / tag if args.capture_video else None,
                              video_episodes=args.video_episodes,
                              trajectory_dir=Path(args.save_trajectories) / tag if args.save_trajectories else None)
            caption = None
            if probe:
                caption = tiny_vlm.caption_accuracy(rollout.base_model(model), processor, env_id, args.caption_frames)
            records.append(dict(model_id=model_id, **record, caption_accuracy=caption))
            print(f"{model_id} {env_id}: success {record['success_rate']:.2f}", flush=True)
        del model

    print(markdown_table(records))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(dict(model_ids=args.model_ids, env_ids=args.env_ids, seed=args.seed,
                                      num_episodes=args.num_episodes, num_envs=args.num_envs,
                                      temperature=args.temperature, decoding="greedy" if args.temperature == 0
                                      else "sampled (top_k=0, top_p=1)", per_model=settings, records=records),
                                 indent=2))
    videos = [video for record in records for video in record["videos"]]
    print(f"results written to {output}" + (f"; GIFs: {' '.join(videos)}" if videos else ""))
