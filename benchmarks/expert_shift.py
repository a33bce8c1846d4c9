"""What did RL change in the decision? The probability of the prior's expert action on held-out states
(tiny_vlm.expert_probabilities: every valid action scored as the whole answer with the true caption as thoughts,
normalised over the actions), for the base tiny model and each trained model, split on MiniWorld by what the frame
shows: the red box straight ahead (expert: move forward), off to a side (turn toward it), or out of view (turn one
fixed way). Success says whether a policy got better; this says which decisions moved (docs/results.md):
    python -m benchmarks.expert_shift --env-id MiniWorld-OneRoom-v0 runs/grid_paper/MiniWorld-OneRoom-v0/*/seed*/model
"""
import argparse

import numpy as np


def kinds(env_id, num_states, seed):
    """Per held-out state that has an expert action (expert_probabilities' order): what the frame shows (MiniWorld;
    elsewhere one kind, "all")."""
    import envs
    import tiny_vlm

    states = [s for s in tiny_vlm.held_out_states(env_id, num_states, seed) if s.expert is not None]
    if env_id not in envs.MINIWORLD_IDS:
        return np.array(["all"] * len(states))
    # State: (frames, prompt, caption, ...); the expert's own split (envs.miniworld_expert): forward = straight ahead
    return np.array(["out of view" if s[2] == "no red box in view" else "straight ahead" if s.expert == 2
                     else "to a side" for s in states])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="trained model directories (vldac.py --save-dir)")
    parser.add_argument("--env-id", required=True, help="the env they were trained on")
    parser.add_argument("--num-states", type=int, default=100, help="held-out states drawn (default: 100)")
    parser.add_argument("--seed", type=int, default=12348, help="held-out states' seed (default: "
                        "expert_probabilities' own, as the prior's test)")
    args = parser.parse_args()
    import torch

    import tiny_vlm
    import vlm

    torch.set_num_threads(1)
    groups = kinds(args.env_id, args.num_states, args.seed)
    names = [k for k in ("straight ahead", "to a side", "out of view") if k in groups]  # none beyond MiniWorld
    print("| " + " | ".join(["model", f"all ({len(groups)} states)", *(f"{k} ({(groups == k).sum()})" for k in names)])
          + " |")
    print("|---" * (len(names) + 2) + "|")
    base = tiny_vlm.tiny_model_path(tiny_vlm.family_of(args.env_id))  # what --model-id tiny trains
    for model_id in [base, *args.models]:
        model, processor = vlm.load_policy(model_id)
        with torch.no_grad():
            p = tiny_vlm.expert_probabilities(model, processor, args.env_id, args.num_states, args.seed)
        label = "base model" if model_id == base else model_id
        print("| " + " | ".join([label, *(f"{x:.3f}" for x in [p.mean(), *(p[groups == k].mean() for k in names)])])
              + " |", flush=True)


if __name__ == "__main__":
    main()
