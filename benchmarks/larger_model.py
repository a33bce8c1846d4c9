"""The same code on a larger, config-built Qwen2-VL: the Qwen2-VL-2B-Instruct layout (its published config:
hidden 1536, intermediate 8960, 12 heads / 2 KV heads, vocab 151936, vision 1280 wide with 16 heads, patch 14,
merge 2) at reduced depth, random weights, LoRA r16, a few updates of vldac.py on CPU.
Usage: python benchmarks/larger_model.py [--text-layers 2] [--vision-depth 2] [--full-depth]
(--full-depth: all 28 text layers and 32 vision blocks, the real 2B architecture: for a GPU)."""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_vlm  # noqa: E402


def build(out, text_layers=2, vision_depth=2):
    """Save the Qwen2-VL-2B-Instruct layout (random weights, the tiny model's processor) to out; returns out.
    Also used by benchmarks/speed.py --model 2b."""
    cfg = tiny_vlm.TinyConfig()
    processor = tiny_vlm.build_processor(cfg, tiny_vlm.tokenizer_corpus(tiny_vlm.StateSampler(cfg.env_ids, 0)))
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in tiny_vlm.SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=text_layers,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    model = Qwen2VLForConditionalGeneration(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters ({text_layers} text layers, "
          f"{vision_depth} vision blocks)", flush=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
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
