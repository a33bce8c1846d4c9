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
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw, ImageFont

import envs
import flags
import rollout
import tiny_vlm
from flags import fail
from vlm import is_tiny, load_policy, locate, model_dir

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
    per model in a sub-directory (rollout.Trajectories documents the format)"""
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
    Returns the metrics (success with its Wilson interval, returns, lengths, the share of unparsable answers and
    the parsed answers' actions, tokens, each episode); the model is left in eval mode. With a TensorBoard
    writer, each episode's return is logged as eval/episodic_return at step k (CleanRL's pattern). With a
    trajectory_dir, every step is written there (rollout.Trajectories)."""
    model.eval()
    num_envs = min(num_envs, num_episodes)
    env_list = [envs.make_env(env_id, **(env_kwargs or {})) for _ in range(num_envs)]
    sampling = rollout.Sampling(temperature, max_new_tokens)
    episodes, videos, steps, parse_failures, response_tokens = [], [], 0, 0, 0
    parsed = Counter()  # action name -> answers that parsed to it (a failed parse plays a random action: not counted)
    playing, gifs = [None] * num_envs, {}  # per env: its rollout.Episode, None when none is left; GIF frames
    trajectories = rollout.Trajectories(trajectory_dir, env_id) if trajectory_dir is not None else None
    for i in range(num_envs):
        playing[i] = rollout.Episode(i, env_list[i].reset(seed=seed + i)[0])
    next_episode = num_envs
    while any(playing):
        active = [i for i in range(num_envs) if playing[i] is not None]
        out = rollout.answer(model, processor, [playing[i].frames for i in active],
                             [env_list[i].prompt() for i in active], sampling)
        response_tokens += int(out.token_mask.sum())
        for i, text in zip(active, out.texts):
            episode, seen = playing[i], playing[i].frames[-1]  # (H, W, 3) the newest frame the model answered
            reward, _, _, info, summary = episode.step(env_list[i], text, trajectories)
            steps += 1
            parse_failures += int(info["parse_failed"])
            if not info["parse_failed"]:
                parsed[env_list[i].actions[info["action"]]] += 1
            if video_dir is not None and episode.number < video_episodes:
                gifs.setdefault(episode.number, []).append(
                    annotate(seen, f"step {episode.length}: {text.strip()} -> reward {reward:+g}"))
            if summary is None:
                continue
            episodes.append(summary)
            if episode.number in gifs:
                gif = gifs.pop(episode.number) + [annotate(episode.frames[-1], f"end: return {episode.ret:+g}, "
                                                  f"{'success' if summary['success'] else 'failure'}")]
                path = Path(video_dir) / f"{env_id.replace('/', '_')}__episode{episode.number}.gif"
                save_gif(path, gif)
                videos.append(str(path))
            playing[i] = None
            if next_episode < num_episodes:  # the next episode, whichever env is free: seed + its number
                playing[i] = rollout.Episode(next_episode, env_list[i].reset(seed=seed + next_episode)[0])
                next_episode += 1
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
                parse_failure_rate=parse_failures / steps, parsed_actions=dict(sorted(parsed.items())),
                response_tokens_mean=response_tokens / steps, episodes=episodes, videos=sorted(videos))


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


def write_results(output, args, settings, records):
    """The JSON of every (model, env) measured so far, replaced whole (a temp file renamed over it)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(dict(model_ids=args.model_ids, env_ids=args.env_ids, seed=args.seed,
                                   num_episodes=args.num_episodes, num_envs=args.num_envs, temperature=args.temperature,
                                   decoding="greedy" if args.temperature == 0 else "sampled (top_k=0, top_p=1)",
                                   per_model=settings, records=records), indent=2))
    os.replace(tmp, output)


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    flags.check(args, flags.EVALUATE)  # every flag's domain, then the envs and the models: before any model loads
    for env_id in args.env_ids:
        if env_id not in envs.ENV_IDS:
            fail(f"unknown --env-ids {env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
        if env_id in envs.MINIWORLD_IDS:  # fail before loading any model if there is no GL context
            try:
                envs.make_env(env_id).close()
            except RuntimeError as e:
                fail(str(e))
    paths = {(m, e): locate(m, e) for m in args.model_ids for e in args.env_ids}  # `tiny`: one model per env family
    output = Path(args.output or f"runs/eval_{int(time.time())}.json")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)  # sampled decoding: the same seed, the same samples
    records, settings = [], {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C: the rows written stay

    try:
        for model_id in args.model_ids:
            tiny = is_tiny(model_id)
            max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["tiny" if tiny else "paper"]
            settings[model_id] = dict(max_new_tokens=max_new_tokens)
            probe = tiny if args.caption_probe is None else args.caption_probe
            loaded = None
            for env_id in args.env_ids:
                if paths[model_id, env_id] != loaded:
                    model, processor = load_policy(model_id, device, env_id=env_id, trainable=False)
                    loaded = paths[model_id, env_id]
                tag = model_id.strip("/").replace("/", "_")
                record = evaluate(model, processor, env_id, args.num_episodes, args.num_envs, args.temperature,
                                  max_new_tokens, args.seed, env_kwargs=checkpoint_env_kwargs(model_id),
                                  video_dir=output.with_suffix("") / tag if args.capture_video else None,
                                  video_episodes=args.video_episodes, trajectory_dir=Path(args.save_trajectories) / tag
                                  if args.save_trajectories else None)
                caption = None
                if probe:
                    caption = tiny_vlm.caption_accuracy(rollout.base_model(model), processor, env_id,
                                                        args.caption_frames)
                records.append(dict(model_id=model_id, **record, caption_accuracy=caption))
                write_results(output, args, settings, records)  # each row as it finishes: a later failure keeps it
                print(f"{model_id} {env_id}: success {record['success_rate']:.2f}", flush=True)
            del model
    except KeyboardInterrupt:
        fail(f"interrupted: {len(records)} of {len(paths)} (model, env) rows finished"
             + (f", written to {output}" if records else ""))

    print(markdown_table(records))
    videos = [video for record in records for video in record["videos"]]
    print(f"results written to {output}" + (f"; GIFs: {' '.join(videos)}" if videos else ""))
