"""Speed of the cached tiny VLM on this machine: one scoring forward and one generate on NumberLine prompts
(what a rollout step does), per batch size, in ms per call and per row. Batch 1 against 16 shows what
batching can gain on this hardware (benchmarks/speed.py, README "Performance").
Usage: python -m benchmarks.tiny_speed [--batch-sizes 1 16]"""
import argparse
import time

import torch

import envs
import rollout
import tiny_vlm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="prompts per call, one timing each")
batch_sizes = parser.parse_args().batch_sizes  # before the model loads: --help answers at once
model, processor = tiny_vlm.load(tiny_vlm.tiny_model_path("numberline"))


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


for batch in batch_sizes:
    env_list = [envs.make_env("gym_cards/NumberLine-v0") for _ in range(batch)]
    frames = [env.reset(seed=i)[0] for i, env in enumerate(env_list)]
    inputs = rollout.prompt_inputs(processor, frames, [env.prompt() for env in env_list], "cpu")
    with torch.no_grad():
        forward = timed(lambda: model(**inputs), repeats=max(3, 160 // batch))
        generate = timed(lambda: model.generate(**inputs, max_new_tokens=25, min_new_tokens=25, do_sample=True,
                                                top_k=0, suppress_tokens=rollout.vision_token_ids(model),
                                                pad_token_id=processor.tokenizer.pad_token_id),
                         repeats=max(3, 48 // batch))
    print(f"torch threads {torch.get_num_threads()}; batch {batch}, prompt {inputs['input_ids'].shape[1]} tokens "
          f"(16 image tokens each): forward {forward * 1000:.1f} ms ({forward * 1000 / batch:.1f} ms per row), "
          f"generate 25 tokens {generate * 1000:.0f} ms ({generate * 1000 / batch:.1f} ms per row)", flush=True)
