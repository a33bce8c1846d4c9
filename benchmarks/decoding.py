"""Where generate()'s time goes on a GPU: the rollout's generate alone at a larger layout (random weights, bf16,
LoRA r16), one prompt batch of NumberLine frames, by decoding variant. A logits processor stamps the time of every
decoding step, so prefill and steady-state steps are told apart without a second call (a second call with
another max_new_tokens would size another static cache and compile again).
Variants: dynamic (DynamicCache, eager), static (transformers' static cache, compiled, adapter unmerged), merged
(the same with the adapter merged into the weights for the call: rollout.lora_merged, --merge-lora-rollout).
Usage (a GPU): python -m benchmarks.decoding --batch 64 --variants dynamic static merged [--profile]"""
import argparse
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import config
import envs
import rollout
import vldac
from benchmarks import larger_model

ROOT = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", choices=["2b", "7b"], default="2b", help="the layout (full depth)")
parser.add_argument("--batch", type=int, default=64, help="prompts per generate call")
parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer (random weights use them all)")
parser.add_argument("--variants", nargs="+", default=["dynamic", "static", "merged"],
                    choices=["dynamic", "static", "merged"], help="decoding variants, timed in this order")
parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant, after one untimed call")
parser.add_argument("--profile", action="store_true", help="also print the top operations of one static call")
parser.add_argument("--seed", type=int, default=1, help="seed of the weights and the envs")
parser.add_argument("--cpu", action="store_true", help="a smoke test: 2 text layers, 2 vision blocks, fp32 on the CPU")


class Stamps(LogitsProcessor):
    """Records the wall time at which each decoding step's logits reach the sampler (the generate loop waits for
    the GPU every step, when it checks whether all rows have finished)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_call(agent, inputs, pad_id, a, static, merge):
    """One generate call -> (seconds to the first token: prefill, median seconds per later decoding step, tokens)."""
    stamps = Stamps()
    generate = agent.policy.generate
    agent.policy.generate = lambda **kw: generate(**kw, logits_processor=LogitsProcessorList([stamps]))
    try:
        sync()
        start = time.perf_counter()
        response = rollout.generate(agent.policy, inputs, pad_id,
                                    rollout.Sampling(1.0, a.max_new_tokens, static, merge))
        sync()
    finally:
        agent.policy.generate = generate
    steps = torch.tensor(stamps.times).diff()
    return stamps.times[0] - start, float(steps.median()), response.shape[1], time.perf_counter() - start


def main():
    a = parser.parse_args()
    torch.manual_seed(a.seed)
    device = torch.device("cpu" if a.cpu else "cuda")
    processor = larger_model.processor()
    depth = (2, 2) if a.cpu else (28, 32)
    built = (larger_model.build_model(a.model, processor, device, torch.float32 if a.cpu else torch.bfloat16, *depth),
             processor)
    args = config.resolve_args(vldac.Args(model_id=f"{a.model}-layout", seed=a.seed, num_envs=a.batch, num_steps=1,
                                         total_timesteps=a.batch, minibatch_size=a.batch,
                                         micro_batch_size=min(32, a.batch), max_new_tokens=a.max_new_tokens,
                                         static_cache=True), built=True)
    agent, processor = vldac.make_agent(args, device, built)
    runner = rollout.EnvRunner([envs.make_env(args.env_id) for _ in range(a.batch)], a.seed)
    inputs = rollout.prompt_inputs(processor, [e.frames for e in runner.episodes],
                                   [env.prompt() for env in runner.envs], device)
    pad_id = processor.tokenizer.pad_token_id
    print(f"batch {a.batch}, prompt {inputs['input_ids'].shape[1]} tokens, {a.max_new_tokens} new tokens, "
          f"{torch.cuda.get_device_name() if not a.cpu else 'cpu'}, torch {torch.__version__}", flush=True)
    for variant in a.variants:
        static, merge = variant != "dynamic", variant == "merged"
        start = time.perf_counter()
        timed_call(agent, inputs, pad_id, a, static, merge)  # compiles (static cache) or warms up
        first = time.perf_counter() - start
        calls = [timed_call(agent, inputs, pad_id, a, static, merge) for _ in range(a.repeats)]
        prefill, step, tokens, total = (sorted(c[i] for c in calls)[len(calls) // 2] for i in range(4))
        print(f"{variant:8s} prefill {1000 * prefill:7.1f} ms | decoding step {1000 * step:6.2f} ms (median) | "
              f"{tokens} tokens | call {total:6.2f} s = {1000 * total / tokens:6.2f} ms per token | "
              f"first call {first:5.1f} s | "
              f"peak {torch.cuda.max_memory_allocated() / 2**30 if not a.cpu else 0:.1f} GiB", flush=True)
        if a.profile and static:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (not a.cpu)) as prof:
                timed_call(agent, inputs, pad_id, a, static, merge)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    counters = torch._dynamo.utils.counters
    print("dynamo:", {k: dict(counters[k]) for k in ("stats", "graph_break") if counters[k]}, flush=True)


if __name__ == "__main__":
    main()
