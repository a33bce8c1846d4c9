"""Why the tiny model uses "ink" normalisation (white = 0): train the tiny vision tower + a linear read-out
of its flattened features to name NumberLine's two digits, with CLIP's normalisation and with ours.
Prints the relative between-image variation of the features at initialisation and the probe's accuracy.
Usage: python -m benchmarks.vision_probe [--steps 300]"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

import envs
import tiny_vlm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=300, help="training steps of the linear read-out, per normalisation")
a = parser.parse_args()
cfg = tiny_vlm.TinyConfig()
sampler = tiny_vlm.StateSampler(["gym_cards/NumberLine-v0"], seed=0)
processor = tiny_vlm.build_processor(cfg, tiny_vlm.tokenizer_corpus(sampler, n=50))
env = envs.make_env("gym_cards/NumberLine-v0")
CLIP = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
for name, norm in [("CLIP mean/std", CLIP), ("ink (white = 0)", dict(image_mean=[1.0] * 3, image_std=[0.5] * 3))]:
    processor.image_processor.image_mean, processor.image_processor.image_std = norm["image_mean"], norm["image_std"]
    torch.manual_seed(0)
    vision = tiny_vlm.build_model(cfg, processor.tokenizer).model.visual
    rng = np.random.default_rng(0)

    def batch(n=32):
        frames, targets = [], []
        for _ in range(n):
            frames.append(env.reset(seed=int(rng.integers(2**31)))[0][-1])
            targets.append((env.unwrapped.goal, env.unwrapped.position))
        pixels = processor.image_processor(images=frames, return_tensors="pt")
        feats = vision(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output  # (n * 16, hidden)
        return feats.view(n, -1), torch.tensor(targets)  # (n, 16 * hidden), (n, 2)

    with torch.no_grad():
        feats, _ = batch(64)
        spread = (feats.std(0).mean() / feats.std()).item()  # between-image std / overall std
    probe = torch.nn.Linear(feats.shape[1], 12)
    optimizer = torch.optim.Adam(list(vision.parameters()) + list(probe.parameters()), lr=2e-3)
    for _ in range(a.steps):
        feats, targets = batch()
        logits = probe(feats)
        loss = F.cross_entropy(logits[:, :6], targets[:, 0]) + F.cross_entropy(logits[:, 6:], targets[:, 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        feats, targets = batch(200)
        logits = probe(feats)
        accuracy = ((logits[:, :6].argmax(1) == targets[:, 0])
                    & (logits[:, 6:].argmax(1) == targets[:, 1])).float().mean()
    print(f"{name:16s}: between-image std / feature std at init {spread:.3f}; "
          f"both digits right after {a.steps} steps: {accuracy:.2f} (chance 1/36)")
