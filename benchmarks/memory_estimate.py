"""Expected peak GPU memory of vldac.py with LoRA r16 at the paper's defaults (16 envs, micro-batch 4, answers of up
to 256 tokens) for the backbones in docs/backbones.md: an ESTIMATE. Parameters are counted exactly, from each
published config built on the meta device (no weights, no download), LoRA on the modules vlm.LORA_TARGETS picks;
activation memory per token is fitted to one H100 measurement (the 7B layout) and checked against another (the 2B
layout at micro-batch 32). Usage: python -m benchmarks.memory_estimate [--micro-batch-size 4]"""
import argparse
import functools
import re
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import vldac
import vlm
from benchmarks import larger_model

ROOT = Path(__file__).resolve().parents[1]

MiB = 2**20
LORA_R, MICRO, ENVS, ANSWER = 16, 4, 16, 256  # the paper's defaults (Table 6) and vldac.py's max_new_tokens
VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2)


def qwen2_vl(layout):  # Qwen2-VL-2B / 7B-Instruct (benchmarks/larger_model.py holds their text configs)
    text = {k: v for k, v in larger_model.LAYOUTS[layout].items() if k != "tie_word_embeddings"}
    return Qwen2VLForConditionalGeneration, Qwen2VLConfig(
        text_config=dict(**text, num_hidden_layers=28), vision_config=dict(**VISION, hidden_size=text["hidden_size"]),
        tie_word_embeddings=larger_model.LAYOUTS[layout]["tie_word_embeddings"])


# Published configs: Qwen2.5-VL-3B-Instruct and gemma-3-4b-it (text and vision towers).
BACKBONES = {
    "Qwen/Qwen2-VL-2B-Instruct": qwen2_vl("2b"),
    "Qwen/Qwen2-VL-7B-Instruct": qwen2_vl("7b"),
    "Qwen/Qwen2.5-VL-3B-Instruct": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=True)),
    "google/gemma-3-4b-it": (Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14), mm_tokens_per_image=256)),
}
# Prompt tokens with each family's own processor: Qwen resizes a frame to multiples of 28 pixels (300x300 card
# frame: 22 x 22 patches, 121 tokens; 80x60 MiniWorld frame: 4 x 6 patches, 6 tokens), Gemma 3 gives every image 256;
# plus the vision start/end markers, the text (110-200 tokens: NumberLine 436 characters, OneRoom 661) and the turns.
PROMPT_TOKENS = {"qwen": {"NumberLine": 121 + 2 + 130, "MiniWorld-OneRoom": 4 * (6 + 2) + 185},
                 "gemma": {"NumberLine": 256 + 2 + 130, "MiniWorld-OneRoom": 4 * (256 + 2) + 185}}


@functools.lru_cache(maxsize=None)  # each config is built once, however many envs and checks ask
def shape(name):
    """(parameters, LoRA parameters, layers, hidden, vocab, KV width) of a published config, built on meta."""
    cls, config = BACKBONES[name]
    with torch.device("meta"):
        model = cls(config)
    text = config.get_text_config()
    lora = sum(LORA_R * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(vlm.LORA_TARGETS, n))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return (sum(p.numel() for p in model.parameters()), lora, text.num_hidden_layers, text.hidden_size,
            text.vocab_size, text.num_key_value_heads * head_dim)


def value_head(hidden):
    with torch.device("meta"):  # vldac's own head, counted without allocating it
        return sum(p.numel() for p in vldac.make_value_head(hidden).parameters())


def parts(name, prompt, answer=ANSWER, micro=MICRO, envs=ENVS, per_token=None):
    """Bytes: fixed (bf16 weights; fp32 adapter and value head with their gradients and Adam moments), the
    update's micro-batch (activations kept for the backward, logits), the rollout's scoring forward (logits of all
    envs) with the KV cache of generate."""
    params, lora, layers, hidden, vocab, kv = shape(name)
    fixed = 2 * params + 16 * (lora + value_head(hidden))
    logits = lambda rows: 10 * rows * answer * vocab  # bf16 logits, their fp32 copy, log-softmax's temporary
    activations = None if per_token is None else per_token * layers * hidden * (prompt + answer) * micro
    rollout = logits(envs) + 2 * 2 * layers * kv * envs * (prompt + answer)
    return fixed, activations, logits(micro), rollout, params, lora


def fit():
    """Activation bytes per (layer x token x row x hidden unit), fitted to the 7B layout at 16:128:4 (NumberLine,
    the tiny processor's 122-token prompts, 256-token answers): 29,003 MiB peak on one H100."""
    fixed, _, logits, _, _, _ = parts("Qwen/Qwen2-VL-7B-Instruct", 122)
    _, _, layers, hidden, _, _ = shape("Qwen/Qwen2-VL-7B-Instruct")
    return (29003 * MiB - fixed - logits) / (layers * hidden * (122 + 256) * MICRO)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch-size", type=int, default=MICRO, help="env steps per forward/backward")
    micro = parser.parse_args().micro_batch_size
    per_token = fit()
    print(f"fitted: {per_token:.1f} bytes of activations per layer, token, row and hidden unit (7B layout)")
    fixed, act, logits, rollout, _, _ = parts("Qwen/Qwen2-VL-2B-Instruct", 122, 48, 32, 64, per_token)
    print(f"check: 2B layout at 64:64:32, 48 tokens: estimated {(fixed + max(act + logits, rollout)) / MiB:,.0f} MiB, "
          f"measured 24,299 MiB (H100)\n")
    print(f"micro-batch {micro}, {ENVS} envs, {ANSWER}-token answers, LoRA r{LORA_R}")
    print("| backbone | parameters | LoRA r16 | env | prompt tokens | update peak | rollout peak | expected peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name in BACKBONES:
        for env, prompt in PROMPT_TOKENS["gemma" if "gemma" in name else "qwen"].items():
            fixed, act, logits, rollout, params, lora = parts(name, prompt, micro=micro, per_token=per_token)
            update, sample = fixed + act + logits, fixed + rollout
            print(f"| {name} | {params / 1e9:.2f}B | {lora / 1e6:.1f}M | {env} | {prompt} | {update / 2**30:.1f} GiB "
                  f"| {sample / 2**30:.1f} GiB | **{max(update, sample) / 2**30:.0f} GiB** |")
