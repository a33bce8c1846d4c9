"""Env steps per second of the authors' batch shape against ours, same code, same machine.

Both configurations run the project's own code (rollout.EnvRunner.collect, vldac.compute_gae, vldac.update)
for the same env steps (one rollout of --env-steps, then --update-epochs PPO epochs); only the batch shape
differs:
    authors  1 env x 256 steps: batch-1 generate and scoring forward per step, minibatch 128, micro batch 1
    ours     16 envs x 16 steps: batched generate and scoring, minibatch 64, micro batch 32
A custom shape is ENVS:MINIBATCH:MICRO, e.g. 16:128:64 (steps per env = env_steps / ENVS).
Each configuration runs in its own subprocess (its own peak RSS / peak GPU memory), with the same seed
and torch threads, after one untimed warm-up env step. Wrapped functions time the iteration (exclusive times):
generate, scoring forward (log-probs + value, rollout and update), reference forward, backward + optimizer
(Tensor.backward, grad clip, optimizer step / zero_grad), processor / image preparation (rollout.prompt_inputs,
rollout.collate), env steps (step, reset), everything else (losses, statistics, decoding, GAE, ...).
Time it on an otherwise idle machine: with other processes on the cores, 2 OpenMP threads make every small
batch-1 op wait for a descheduled thread (measured: up to 10x slower); --threads 1 is the robust fallback.
Usage: python -m benchmarks.speed [--env-steps 256] [--configs authors ours] [--markdown] [--model 2b]
"""
import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"authors": "1:128:1", "ours": "16:64:32"}  # ENVS:MINIBATCH:MICRO
PARTS = ["generate", "vision tower", "scoring forward", "reference forward", "backward + optimizer",
         "processor / images", "env steps", "everything else"]
MODEL_PARTS = PARTS[:5]  # model compute

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--env-steps", type=int, default=256, help="env steps per configuration (one rollout)")
parser.add_argument("--update-epochs", type=int, default=2, help="PPO epochs over the rollout (paper: 2)")
parser.add_argument("--configs", nargs="+", default=["authors", "ours", "16:128:64"],
                    help="presets (authors, ours) or ENVS:MINIBATCH:MICRO; ratios are against the first")
parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
parser.add_argument("--cuda", action="store_true", help="run on the GPU (bf16, as vldac.py)")
parser.add_argument("--model", choices=["tiny", "2b", "7b"], default="tiny",
                    help="tiny: the cached tiny model; 2b / 7b: the Qwen2-VL-2B / 7B-Instruct layout, random weights "
                         "made in each worker (bf16 on the GPU, never saved), LoRA r16")
parser.add_argument("--text-layers", type=int, default=2, help="--model 2b/7b: text layers (both: 28)")
parser.add_argument("--vision-depth", type=int, default=2, help="--model 2b/7b: vision blocks (both: 32)")
parser.add_argument("--full-depth", action="store_true", help="--model 2b/7b: all 28 text layers, 32 vision blocks")
parser.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                    help="vldac.py --static-cache (default: as vldac.py, on with --cuda and LoRA)")
parser.add_argument("--merge-lora-rollout", action="store_true",
                    help="decode with the adapter merged (vldac.py's flag)")
parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's (tiny 48, 2b 256)")
parser.add_argument("--seed", type=int, default=1, help="seed of envs, sampling and weights")
parser.add_argument("--env-id", default="gym_cards/NumberLine-v0", help="the env the rollout plays")
parser.add_argument("--markdown", action="store_true", help="also print a README-ready table")
parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON


def shape(spec, env_steps):
    """'authors' / 'ours' / 'ENVS:MINIBATCH:MICRO' -> (num_envs, num_steps, minibatch, micro)."""
    num_envs, minibatch, micro = (int(x) for x in PRESETS.get(spec, spec).split(":"))
    minibatch = min(minibatch, env_steps)  # short runs (--env-steps 32) still get one optimizer step per epoch
    return num_envs, env_steps // num_envs, minibatch, min(micro, minibatch)


def run_worker(a):
    """One configuration in this process: set up as vldac.py does, time one rollout + update."""
    import numpy as np
    import torch

    import config
    import envs
    import rollout
    import vldac

    num_envs, num_steps, minibatch, micro = shape(a.worker, a.env_steps)
    torch.set_num_threads(a.threads)
    args = config.resolve_args(vldac.Args(  # a layout is no tiny model: the paper's defaults (LoRA r16)
        model_id="tiny" if a.model == "tiny" else f"{a.model}-layout", env_id=a.env_id, seed=a.seed, cuda=a.cuda,
        static_cache=a.static_cache, merge_lora_rollout=a.merge_lora_rollout, num_envs=num_envs,
        num_steps=num_steps, total_timesteps=num_envs * num_steps, minibatch_size=minibatch,
        micro_batch_size=micro, update_epochs=a.update_epochs,
        max_new_tokens=a.max_new_tokens), built=a.model != "tiny")
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if a.cuda and torch.cuda.is_available() else "cpu")
    env_list = [envs.make_env(args.env_id) for _ in range(args.num_envs)]
    built = None
    if a.model != "tiny":  # weights made here: bf16 on the GPU (the adapter fp32), fp32 on the CPU
        import larger_model

        layers, depth = (28, 32) if a.full_depth else (a.text_layers, a.vision_depth)
        processor = larger_model.processor()
        built = (larger_model.build_model(a.model, processor, device, torch.bfloat16 if device.type == "cuda"
                                          else torch.float32, layers, depth), processor)
    agent, processor = vldac.make_agent(args, device, built)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    runner = rollout.EnvRunner(env_list, args.seed)
    # Warm-up, not timed: one rollout step (the static cache compiles) and one update on it (on a freshly started
    # GPU machine the first process's update ran 2.6x slower than the next process's).
    warm = runner.collect(agent, processor, 1)
    advantages, returns = vldac.compute_gae(warm.rewards, warm.values, warm.terminated, warm.truncated,
                                            warm.bootstrap_values, warm.last_values, args.gamma, args.gae_lambda)
    vldac.update(agent, optimizer, warm, advantages, returns, dataclasses.replace(args, update_epochs=1),
                 processor.tokenizer)

    # Exclusive timers: a timed call inside another (a forward inside vldac.update) is subtracted from it.
    totals, open_calls = defaultdict(float), []  # open_calls: time of timed children, per open call
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(part, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            open_calls.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                elapsed = time.perf_counter() - start
                totals[part] += elapsed - open_calls.pop()
                if open_calls:
                    open_calls[-1] += elapsed
        return wrapper

    decode_steps = [0, 0]  # (decoding steps, generate calls): one step per token of the longest answer

    def counted(generate):
        @functools.wraps(generate)
        def wrapper(*args, **kwargs):
            sequences = generate(*args, **kwargs)
            decode_steps[0] += sequences.shape[1] - kwargs["input_ids"].shape[1]
            decode_steps[1] += 1
            return sequences
        return wrapper

    agent.policy.generate = timed("generate", counted(agent.policy.generate))
    agent.get_logprobs_and_value = timed("scoring forward", agent.get_logprobs_and_value)  # rollout and update
    agent.get_value = timed("scoring forward", agent.get_value)  # bootstrap values of truncated / last states
    agent.get_reference_logprobs = timed("reference forward", agent.get_reference_logprobs)
    rollout.encode_images = timed("vision tower", rollout.encode_images)  # once per step (where the family can)
    rollout.prompt_inputs = timed("processor / images", rollout.prompt_inputs)
    rollout.collate = timed("processor / images", rollout.collate)
    for env in env_list:
        env.step = timed("env steps", env.step)
        env.reset = timed("env steps", env.reset)
    torch.Tensor.backward = timed("backward + optimizer", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("backward + optimizer", torch.nn.utils.clip_grad_norm_)
    optimizer.step = timed("backward + optimizer", optimizer.step)
    optimizer.zero_grad = timed("backward + optimizer", optimizer.zero_grad)

    # One iteration: rollout, GAE, advantage normalisation, PPO epochs (the policy update, not the warm-up).
    sync()
    start = time.perf_counter()
    batch = runner.collect(agent, processor, args.num_steps)
    rollout_seconds = time.perf_counter() - start
    advantages, returns = vldac.compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated,
                                            batch.bootstrap_values, batch.last_values, args.gamma, args.gae_lambda)
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    vldac.update(agent, optimizer, batch, advantages, returns, args, processor.tokenizer)
    sync()
    seconds = time.perf_counter() - start
    totals["everything else"] += seconds - sum(totals.values())  # the untimed rest of the iteration
    print("RESULT " + json.dumps(dict(
        spec=a.worker, num_envs=num_envs, num_steps=num_steps, minibatch=minibatch, micro=micro, seconds=seconds,
        rollout_seconds=rollout_seconds, sps=args.batch_size / seconds, parts={p: totals[p] for p in PARTS},
        response_tokens=batch.response_tokens, max_new_tokens=args.max_new_tokens, lora_r=args.lora_r,
        ms_per_decode_step=1000 * totals["generate"] / max(1, decode_steps[0]), decode_steps=decode_steps[0],
        static_cache=agent.sampling.static_cache, merge_lora=agent.sampling.merge_lora,
        parameters=sum(p.numel() for p in agent.policy.parameters()),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")), flush=True)


def hardware(threads, cuda):
    """One line: CPU model and cores, torch threads, GPU (if any), python / torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if cuda and torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {threads} torch threads{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def name(r):
    return f"{r['spec']}: {r['num_envs']} env x {r['num_steps']} steps, minibatch {r['minibatch']}, micro {r['micro']}"


if __name__ == "__main__":
    a = parser.parse_args()
    if a.worker:
        run_worker(a)
        sys.exit(0)
    load_before, results = os.getloadavg()[0], []  # the machine's load: other processes distort the timings
    for spec in a.configs:
        command = [sys.executable, "-m", "benchmarks.speed", "--worker", spec, "--env-steps", str(a.env_steps),
                   "--update-epochs", str(a.update_epochs), "--threads", str(a.threads), "--seed", str(a.seed),
                   "--env-id", a.env_id, "--model", a.model, "--text-layers", str(a.text_layers),
                   "--vision-depth", str(a.vision_depth)]
        command += (["--cuda"] if a.cuda else []) + (["--full-depth"] if a.full_depth else [])
        command += [] if a.static_cache is None else ["--static-cache" if a.static_cache else "--no-static-cache"]
        command += ["--merge-lora-rollout"] if a.merge_lora_rollout else []
        command += ["--max-new-tokens", str(a.max_new_tokens)] if a.max_new_tokens else []
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"configuration {spec} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
        results.append(json.loads(lines[0][len("RESULT "):]))
        r = results[-1]
        memory = f"peak RSS {r['peak_rss_mb']:.0f} MB" + (
            f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] is not None else "")
        print(f"\n{name(r)}\n  {r['num_envs'] * r['num_steps']} env steps in {r['seconds']:.1f} s "
              f"(rollout {r['rollout_seconds']:.1f} s, update {r['seconds'] - r['rollout_seconds']:.1f} s): "
              f"{r['sps']:.2f} env steps/s, "
              f"{r['sps'] / results[0]['sps']:.2f}x; {memory}; {r['response_tokens']:.1f} tokens per answer; "
              f"generate {r['ms_per_decode_step']:.1f} ms per decoding step ({r['decode_steps']} steps, static cache "
              f"{'on' if r['static_cache'] else 'off'}, LoRA merged {'on' if r['merge_lora'] else 'off'})")
        for part in PARTS:
            print(f"  {part:<22} {r['parts'][part]:8.2f} s {100 * r['parts'][part] / r['seconds']:6.1f} %")
        model = sum(r["parts"][p] for p in MODEL_PARTS)
        print(f"  {'model compute':<22} {model:8.2f} s {100 * model / r['seconds']:6.1f} %", flush=True)

    print(f"\n{a.model} model ({results[0]['parameters']:,} parameters, LoRA r {results[0]['lora_r']}), {a.env_id}, "
          f"{a.env_steps} env steps, {a.update_epochs} PPO epochs, max {results[0]['max_new_tokens']} new tokens")
    print(hardware(a.threads, a.cuda) + f"; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    for r in results[1:]:
        print(f"{r['spec']} / {results[0]['spec']}: {r['sps'] / results[0]['sps']:.2f}x env steps/s")
    if a.markdown:
        gpu = results[0]["peak_gpu_mb"] is not None
        print(f"\n| configuration | env steps/s | vs {results[0]['spec']} | " + " | ".join(f"{p} %" for p in PARTS)
              + " | model compute % | peak RSS MB |" + (" peak GPU MB |" if gpu else ""))
        print("|---" * (len(PARTS) + 5 + gpu) + "|")
        for r in results:
            parts = " | ".join(f"{100 * r['parts'][p] / r['seconds']:.0f}" for p in PARTS)
            model = 100 * sum(r["parts"][p] for p in MODEL_PARTS) / r["seconds"]
            print(f"| {name(r)} | {r['sps']:.1f} | {r['sps'] / results[0]['sps']:.1f}x | {parts} | {model:.0f} | "
                  f"{r['peak_rss_mb']:.0f} |" + (f" {r['peak_gpu_mb']:.0f} |" if gpu else ""))
        print(f"\n{hardware(a.threads, a.cuda)}")
