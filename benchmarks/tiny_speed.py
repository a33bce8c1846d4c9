"""Speed of the cached tiny VLM on this machine: one scoring forward and one generate, batch 16,
on NumberLine prompts (what a rollout step does). Usage: python benchmarks/tiny_speed.py"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import rollout  # noqa: E402
import tiny_vlm  # noqa: E402

model, processor = tiny_vlm.load(tiny_vlm.tiny_model_path())
env_list = [envs.make_env("gym_cards/NumberLine-v0") for _ in range(16)]
frames = [env.reset(seed=i)[0] for i, env in enumerate(env_list)]
inputs = rollout.prompt_inputs(processor, frames, [env.prompt() for env in env_list], "cpu")


def timed(fn, repeats=10):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


with torch.no_grad():
    forward = timed(lambda: model(**inputs))
    generate = timed(lambda: model.generate(**inputs, max_new_tokens=25, min_new_tokens=25, do_sample=True,
                                            top_k=0, suppress_tokens=tiny_vlm.vision_token_ids(model.config),
                                            pad_token_id=processor.tokenizer.pad_token_id), repeats=3)
print(f"torch threads {torch.get_num_threads()}; batch 16, prompt {inputs['input_ids'].shape[1]} tokens "
      f"(16 image tokens each): forward {forward * 1000:.0f} ms, generate 25 tokens {generate * 1000:.0f} ms")
