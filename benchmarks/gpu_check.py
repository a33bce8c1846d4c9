"""Is training on the GPU as healthy as on the CPU? The tiny model's first iterations on NumberLine, per way of
holding the weights, and the quick start itself (a few minutes on one GPU):

    bf16    every weight in bf16, Adam's state too (what vldac.py did on CUDA before --bf16 kept fp32 weights)
    mixed   bf16 weights, the TRAINABLE ones and Adam's state in fp32, bf16 autocast (vldac.py's default on CUDA)
    fp32    every weight in fp32

each with SDPA attention (transformers' default) or eager attention. First, per variant: whether generate() samples
from the distribution that the scoring forward computes (logits compared token by token), whether the GPU computes
what an fp32 copy on the CPU computes for the same inputs, and the caption accuracy of held-out frames (does the
model read this machine's frames?). Per iteration: the first epoch's largest |log ratio| (the rollout's scoring
forward against the update's re-collated micro-batches: 0 in exact arithmetic), kl_ref of the first minibatch (0:
the policy is still the reference), then the update's kl_ref, parse failures and success. --cross also updates one
rollout batch (collected on the CPU, or on the GPU) on both devices from the same state. Variants and seeds run in
parallel subprocesses, the quick start beside them.
Usage: python -m benchmarks.gpu_check [--iterations 8] [--seeds 1 2] [--cross] [--out DIR] [--quickstart-seconds 240]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["bf16:sdpa", "bf16:eager", "mixed:sdpa", "mixed:eager", "fp32:sdpa"]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iterations", type=int, default=8, help="iterations per variant (the first 2: value warm-up)")
parser.add_argument("--variants", nargs="+", default=VARIANTS, help="PRECISION:ATTENTION pairs")
parser.add_argument("--seed", type=int, default=1, help="seed of the quick start (and of a worker)")
parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds of the variants, one worker each")
parser.add_argument("--cross", action="store_true",
                    help="also update one rollout batch on the CPU and on the GPU (cross:cpu, cross:cuda per seed)")
parser.add_argument("--out", default="runs/gpu_check", help="logs and results.json")
parser.add_argument("--quickstart-seconds", type=int, default=240, help="stop the quick start after this (0: skip)")
parser.add_argument("--quickstart-args", nargs="*", default=[], help="extra vldac.py flags for the quick start")
parser.add_argument("--cpu", action="store_true", help="run on the CPU (a check of this script)")
parser.add_argument("--worker", help=argparse.SUPPRESS)


def first_epoch(agent, batch, args, tokenizer):
    """Before any optimizer step: the update's micro-batches (shuffled, as vldac.update draws them) scored again.
    Returns (max |log ratio|, mean |log ratio| over tokens, kl_ref of the first minibatch)."""
    import torch

    import rollout
    import vldac

    order, worst, total, tokens, kl = torch.randperm(len(batch.steps)), 0.0, 0.0, 0, None
    with torch.no_grad():
        for micro in order.split(args.micro_batch_size):
            index = micro.tolist()
            inputs, response_ids, token_mask = rollout.collate([batch.steps[i] for i in index], tokenizer.pad_token_id,
                                                               agent.device)
            old, ref = (rollout.pad_stack([x[i] for i in index], response_ids.shape[1]).to(agent.device)
                        for x in (batch.logprobs, batch.ref_logprobs))
            logprobs, _ = agent.get_logprobs_and_value(inputs, response_ids, token_mask)
            log_ratio = (logprobs - old)[token_mask].abs()
            worst, total, tokens = max(worst, log_ratio.max().item()), total + log_ratio.sum().item(), \
                tokens + log_ratio.numel()
            if kl is None:
                kl = vldac.kl_penalty(logprobs, ref, token_mask).item()
    return worst, total / tokens, kl


def scored(agent, model, inputs, response_ids, mask):
    """The scoring forward of model (the policy or a copy): logits at every response position (B, R, V), position j
    predicting token j, and the hidden state at the last prompt token (B, H), which the value head reads."""
    import rollout

    hidden = agent._hidden(model, inputs, response_ids, mask)  # (B, P + R, H)
    prompt_len = inputs["input_ids"].shape[1]
    with rollout.compute_context(model):
        return rollout.base_model(model).lm_head(hidden[:, prompt_len - 1 : -1]), hidden[:, prompt_len - 1]


def next_batch(runner, agent, processor, optimizer, iteration, args):
    """vldac.py's stages 1-3 for one iteration: the learning rate, a rollout, GAE, normalised advantages."""
    import vldac

    optimizer.param_groups[0]["lr"] = vldac.cosine_learning_rate(iteration, args)
    batch = runner.collect(agent, processor, args.num_steps)
    advantages, returns = vldac.compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated,
                                            batch.bootstrap_values, batch.last_values, args.gamma, args.gae_lambda)
    return batch, vldac.normalize_advantages(advantages), returns


def sampling_check(agent, processor, runner, args, batches=4):
    """Does generate() sample from the distribution the scoring forward computes? A few batched generates of the
    current states with their logits kept, against the scoring forward at the same tokens: the largest logit
    difference, and how often a token the scoring forward finds unlikely (log-prob < -5) was sampled against how
    often it should be (the scored probability mass below that line, summed over positions). On the CPU, in fp32:
    the logits agree to 1e-5, and 0 of 1,088 tokens were that unlikely (0.0009 expected; seed 1)."""
    import torch

    import rollout

    inputs = rollout.prompt_inputs(processor, [e.frames for e in runner.episodes],
                                   [env.prompt() for env in runner.envs], agent.device)
    difference, sampled, expected, tokens = 0.0, 0.0, 0.0, 0
    for _ in range(batches):
        with torch.no_grad(), rollout.compute_context(agent.policy):
            out = agent.policy.generate(**inputs, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                        repetition_penalty=1.0, max_new_tokens=args.max_new_tokens,
                                        suppress_tokens=agent.suppress_token_ids, eos_token_id=agent.eos_token_ids,
                                        pad_token_id=processor.tokenizer.pad_token_id, output_logits=True,
                                        return_dict_in_generate=True)
        response_ids = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, R)
        mask = rollout.response_mask(response_ids, torch.tensor(agent.eos_token_ids, device=agent.device))
        with torch.no_grad():
            logits, _ = scored(agent, agent.policy, inputs, response_ids, mask)
        suppressed = torch.tensor(agent.suppress_token_ids, device=logits.device)
        # (B, R, V)
        every = (logits.float() / args.temperature).index_fill(-1, suppressed, float("-inf")).log_softmax(-1)
        difference = max(difference,
                         (torch.stack(out.logits, 1).float() - logits.float()).abs().amax(-1)[mask].max().item())
        picked = every.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)[mask]  # (tokens,)
        sampled += (picked < -5).sum().item()
        expected += torch.where(every < -5, every.exp(), 0.0).sum(-1)[mask].sum().item()
        tokens += int(mask.sum())
    return dict(max_logit_difference=difference, unlikely_tokens=sampled / tokens, unlikely_expected=expected / tokens,
                tokens=tokens)


def device_check(agent, processor, runner, args, env_id):
    """Does the model compute on the GPU what it computes on the CPU? Rollout prompts with sampled answers, scored
    by the policy as it runs on the GPU and by an fp32 copy of it on the CPU: the largest difference of the
    log-softmax over every response position, the mean KL(CPU || GPU) per token, the largest value difference at the
    last prompt token; and the caption accuracy of held-out frames (greedy, 100 frames; 0.99 on the CPU)."""
    import copy

    import torch

    import rollout
    import tiny_vlm

    inputs = rollout.prompt_inputs(processor, [e.frames for e in runner.episodes],
                                   [env.prompt() for env in runner.envs], agent.device)
    response_ids = rollout.generate(agent.policy, inputs, processor.tokenizer.pad_token_id,
                                    rollout.Sampling(args.temperature, args.max_new_tokens))
    mask = rollout.response_mask(response_ids, torch.tensor(agent.eos_token_ids, device=agent.device))
    cpu = copy.deepcopy(agent.policy).float().cpu()
    head = copy.deepcopy(agent.value_head).float().cpu()
    distributions, values = [], []
    with torch.no_grad():
        for model, value_head, device in ((agent.policy, agent.value_head, agent.device), (cpu, head, "cpu")):
            logits, last = scored(agent, model, {k: v.to(device) for k, v in inputs.items()}, response_ids.to(device),
                                  mask.to(device))
            distributions.append((logits.float().cpu() / args.temperature).log_softmax(-1))  # (B, R, V)
            values.append(value_head(last.float()).squeeze(-1).cpu())
    gpu, ref = distributions
    keep = mask.cpu()
    kl = (ref.exp() * (ref - gpu)).sum(-1)[keep]  # per response token
    finite = torch.isfinite(gpu) & torch.isfinite(ref)
    return dict(max_logprob_difference_vs_cpu=(gpu - ref).where(finite, 0).abs().amax(-1)[keep].max().item(),
                mean_kl_cpu_gpu=kl.mean().item(),
                max_value_difference_vs_cpu=(values[0] - values[1]).abs().max().item(),
                caption_accuracy=tiny_vlm.caption_accuracy(agent.policy, processor, env_id, num_frames=100))


def cross_check(rollout_device, a):
    """One rollout batch, updated on the CPU and on the GPU from the same weights and optimizer state (fp32 both):
    the rollout is collected on rollout_device, iterations 1-2 are the value warm-up, iteration 3's batch is the
    first policy update. Same minibatch order on both. If the GPU's update moves the policy much further than the
    CPU's (kl_ref), the GPU's update computes something else; if both jump on a GPU rollout only, the rollout is
    what differs. Also: the share of rollout tokens with log-prob < -5 (unlikely samples)."""
    import copy

    import numpy as np
    import torch

    import config
    import envs
    import rollout
    import vldac

    torch.set_num_threads(1)
    args = config.resolve_args(vldac.Args(seed=a.seed, bf16=False, static_cache=False, cuda=rollout_device == "cuda"))
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    agent, processor = vldac.make_agent(args, torch.device(rollout_device))
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    runner = rollout.EnvRunner([envs.make_env(args.env_id) for _ in range(args.num_envs)], args.seed)
    for iteration in (1, 2, 3):
        batch, advantages, returns = next_batch(runner, agent, processor, optimizer, iteration, args)
        if iteration < 3:
            vldac.update(agent, optimizer, batch, advantages, returns, args, processor.tokenizer, value_warmup=True)
    logprobs = torch.cat(batch.logprobs)
    result = dict(variant=f"cross:{rollout_device}", iteration=3,
                  unlikely_rollout_tokens=(logprobs < -5).float().mean().item(),
                  tokens=len(logprobs), parse_failure_rate=batch.parse_failures / len(batch.steps))
    for name, device in (("cpu", "cpu"), ("cuda", "cuda" if torch.cuda.is_available() else "cpu")):
        copy_ = copy.deepcopy(agent).to(device)
        copy_.reference = [r.to(device) for r in copy_.reference]
        opt = torch.optim.Adam([p for p in copy_.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
        opt.load_state_dict(optimizer.state_dict())
        torch.manual_seed(99)  # the same minibatch order
        stats = vldac.update(copy_, opt, batch, advantages, returns, args, processor.tokenizer)
        result.update({f"{name}_update_{k}": stats[k] for k in ("kl_ref", "approx_kl", "clipfrac", "policy_loss")})
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(spec, a):
    """One variant, in this process: vldac.py's loop for a few iterations, printing one JSON line per iteration."""
    import numpy as np
    import torch

    import config
    import envs
    import rollout
    import vldac

    precision, attention = spec.split(":")
    torch.set_num_threads(1)  # several variants share the machine's cores
    device = torch.device("cpu" if a.cpu else "cuda")
    args = config.resolve_args(vldac.Args(seed=a.seed, bf16=precision != "fp32", static_cache=False, cuda=not a.cpu))
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    agent, processor = vldac.make_agent(args, device)
    models = [agent.policy] + (agent.reference or [])
    for model in models:
        if precision == "bf16":
            model.to(torch.bfloat16)  # every weight, the trainable ones too
        model.set_attn_implementation(attention)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    runner = rollout.EnvRunner([envs.make_env(args.env_id) for _ in range(args.num_envs)], args.seed)
    trainable = {str(p.dtype) for p in agent.policy.parameters() if p.requires_grad}
    checks = sampling_check(agent, processor, runner, args)
    checks.update(device_check(agent, processor, runner, args, args.env_id))
    print("RESULT " + json.dumps(dict(variant=spec, iteration=0, **checks)), flush=True)
    for iteration in range(1, a.iterations + 1):
        start = time.time()
        batch, advantages, returns = next_batch(runner, agent, processor, optimizer, iteration, args)
        worst, mean, kl_first = first_epoch(agent, batch, args, processor.tokenizer)
        stats = vldac.update(agent, optimizer, batch, advantages, returns, args, processor.tokenizer,
                             value_warmup=iteration <= args.value_warmup_iters)
        episodes = batch.episodes
        print("RESULT " + json.dumps(dict(
            variant=spec, iteration=iteration, trainable_dtype=sorted(trainable), max_abs_log_ratio=worst,
            mean_abs_log_ratio=mean, kl_ref_first_minibatch=kl_first, kl_ref=stats["kl_ref"],
            approx_kl=stats["approx_kl"], clipfrac=stats["clipfrac"],
            parse_failure_rate=batch.parse_failures / len(batch.steps),
            success_rate=sum(e["success"] for e in episodes) / len(episodes) if episodes else None,
            seconds=time.time() - start)), flush=True)


if __name__ == "__main__":
    a = parser.parse_args()
    if a.worker:
        cross_check(a.worker.split(":")[1], a) if a.worker.startswith("cross:") else run_worker(a.worker, a)
        sys.exit(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    specs = [(spec, seed) for seed in a.seeds
             for spec in a.variants + (["cross:cpu"] + ["cross:cuda"] * (not a.cpu)) * a.cross]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = {}
    for spec, seed in specs:
        name = f"{spec.replace(':', '_')}_seed{seed}"
        flags = ["--iterations", str(a.iterations), "--seed", str(seed)] + (["--cpu"] if a.cpu else [])
        workers[(spec, seed)] = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--worker", spec,
                                                  *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=open(out / f"{name}.err", "w"), text=True)
    quickstart = None
    if a.quickstart_seconds:  # the README's quick start as a user runs it on a GPU (no evaluation episodes)
        command = [sys.executable, "vldac.py", "--env-id", "gym_cards/NumberLine-v0", "--eval-episodes", "0",
                   "--exp-name", "gpu_check", "--seed", str(a.seed),
                   *a.quickstart_args] + (["--no-cuda"] if a.cpu else [])
        quickstart = subprocess.Popen(["timeout", str(a.quickstart_seconds), *command], cwd=ROOT,
                                      stdout=open(out / "quickstart.log", "w"), stderr=subprocess.STDOUT)
    results = []
    for (spec, seed), worker in workers.items():  # each prints everything at the end of its run, so read them in turn
        output, _ = worker.communicate()
        label = f"{spec} seed {seed}"
        for line in output.splitlines():
            if not line.startswith("RESULT "):
                continue
            r = dict(json.loads(line[len("RESULT "):]), seed=seed)
            results.append(r)
            if spec.startswith("cross:"):
                print(f"{label:<20} rollout parse_fail {r['parse_failure_rate']:.2f}, tokens with log-prob < -5: "
                      f"{r['unlikely_rollout_tokens']:.4f} of {r['tokens']} | iteration 3 update on the CPU: kl_ref "
                      f"{r['cpu_update_kl_ref']:.4f} approx_kl {r['cpu_update_approx_kl']:.4f} clipfrac "
                      f"{r['cpu_update_clipfrac']:.3f} | on the GPU: kl_ref {r['cuda_update_kl_ref']:.4f} approx_kl "
                      f"{r['cuda_update_approx_kl']:.4f} clipfrac {r['cuda_update_clipfrac']:.3f}", flush=True)
            elif r["iteration"] == 0:
                print(f"{label:<20} sampling: generate's logits vs the scoring forward's: largest difference "
                      f"{r['max_logit_difference']:.4f}; sampled tokens with log-prob < -5: "
                      f"{r['unlikely_tokens']:.4f} of {r['tokens']} (expected {r['unlikely_expected']:.4f})",
                      flush=True)
                if "caption_accuracy" in r:
                    print(f"{label:<20} vs an fp32 copy on the CPU: log-prob difference up to "
                          f"{r['max_logprob_difference_vs_cpu']:.4f}, mean KL {r['mean_kl_cpu_gpu']:.2e}, value up to "
                          f"{r['max_value_difference_vs_cpu']:.4f}; caption accuracy {r['caption_accuracy']:.2f}",
                          flush=True)
            else:
                print(f"{label:<20} iter {r['iteration']}: max |log ratio| {r['max_abs_log_ratio']:.4f} mean "
                      f"{r['mean_abs_log_ratio']:.5f} | kl_ref first minibatch {r['kl_ref_first_minibatch']:.5f}, "
                      f"update {r['kl_ref']:.4f} | clipfrac {r['clipfrac']:.3f} parse_fail "
                      f"{r['parse_failure_rate']:.2f} success {r['success_rate']} ({r['seconds']:.1f} s)", flush=True)
        if worker.returncode:
            print(f"{label} failed (exit {worker.returncode}); "
                  f"see {out / (spec.replace(':', '_') + f'_seed{seed}.err')}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if quickstart is not None:
        quickstart.wait()
        lines = (out / "quickstart.log").read_text().splitlines()
        print("quick start (" + ("stopped at the time limit" if quickstart.returncode == 124 else
                                 f"exit {quickstart.returncode}") + "):\n" + "\n".join(
            line for line in lines if line.startswith(("iter", "NumberLine", "gym_cards")) or "Error" in line))
    print(f"{time.time() - start:.0f} s", flush=True)
