"""The same code on a larger, config-built Qwen2-VL: the Qwen2-VL-2B-Instruct layout (its published config:
hidden 1536, intermediate 8960, 12 heads / 2 KV heads, vocab 151936, vision 1280 wide with 16 heads, patch 14,
merge 2; LAYOUTS also holds the 7B's) at reduced depth, random weights, LoRA r16, a few updates of vldac.py on CPU.
Usage: python -m benchmarks.larger_model [--text-layers 2] [--vision-depth 2] [--full-depth]
(--full-depth: all 28 text layers and 32 vision blocks, the real 2B architecture: for a GPU)."""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import tiny_vlm

ROOT = Path(__file__).resolve().parents[1]

# The published configs of Qwen2-VL-2B-Instruct and Qwen2-VL-7B-Instruct (text model; the vision tower is the same
# 32 x 1280 ViT, its merger projecting to the text width).
LAYOUTS = {"2b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                      vocab_size=151936, tie_word_embeddings=True),
           "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                      vocab_size=152064, tie_word_embeddings=False)}


def processor():
    """The tiny model's processor (its tokenizer: a small vocabulary inside the layout's)."""
    cfg = tiny_vlm.TinyConfig()
    return tiny_vlm.build_processor(cfg, tiny_vlm.tokenizer_corpus(tiny_vlm.StateSampler(cfg.env_ids, 0)))


def layout_config(layout, processor, text_layers=28, vision_depth=32):
    """A Qwen2VLConfig of the layout (2b / 7b) at the given depth, its special tokens from processor's tokenizer."""
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in tiny_vlm.SPECIAL_TOKENS}
    text = {k: v for k, v in LAYOUTS[layout].items() if k != "tie_word_embeddings"}
    return Qwen2VLConfig(
        text_config=dict(**text, num_hidden_layers=text_layers, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, embed_dim=1280, hidden_size=text["hidden_size"], num_heads=16,
                           mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=LAYOUTS[layout]["tie_word_embeddings"])


def build_model(layout, processor, device="cpu", dtype=torch.float32, text_layers=28, vision_depth=32):
    """Random weights of the layout, made directly on device in dtype (a 7B model never touches the disk)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(layout_config(layout, processor, text_layers, vision_depth))
    finally:
        torch.set_default_dtype(default)
    print(f"{layout} layout: {sum(p.numel() for p in model.parameters()):,} parameters ({text_layers} text layers, "
          f"{vision_depth} vision blocks), {dtype} on {device}", flush=True)
    return model.eval()


def build(out, text_layers=2, vision_depth=2, layout="2b"):
    """Save the layout (random weights, the tiny model's processor) to out; returns out."""
    proc = processor()
    build_model(layout, proc, "cpu", torch.float32, text_layers, vision_depth).save_pretrained(out)
    proc.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=2, help="language-model layers (the real 2B has 28)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision-tower blocks (the real 2B has 32)")
    parser.add_argument("--full-depth", action="store_true", help="all 28 text layers and 32 vision blocks (a GPU)")
    parser.add_argument("--env-id", default="gym_cards/NumberLine-v0", help="the env vldac.py trains on")
    a = parser.parse_args()
    text_layers, vision_depth = (28, 32) if a.full_depth else (a.text_layers, a.vision_depth)
    out = build(Path(tempfile.mkdtemp(prefix="qwen2vl-2b-layout-")), text_layers, vision_depth)

    # A real checkpoint's defaults (LoRA r16, Table 6), with a tiny budget: 4 envs x 4 steps, 3 iterations.
    command = [sys.executable, str(ROOT / "vldac.py"), "--env-id", a.env_id, "--model-id", str(out),
               "--num-envs", "4", "--num-steps", "4", "--total-timesteps", "48", "--minibatch-size", "16",
               "--micro-batch-size", "4", "--max-new-tokens", "24", "--value-warmup-iters", "1",
               "--exp-name", "larger_model"]
    start = time.time()
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=ROOT, capture_output=True, text=True)
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith(("iter", "runs", "larger"))))
    peak = [line for line in result.stderr.splitlines() if "Maximum resident" in line]
    print(f"exit {result.returncode}; wall {time.time() - start:.0f} s; {peak[0].strip() if peak else ''}")
    if torch.cuda.is_available():
        print("(on a GPU vldac.py runs bf16; read peak GPU memory from nvidia-smi or torch.cuda.max_memory_allocated)")
    sys.exit(result.returncode)
